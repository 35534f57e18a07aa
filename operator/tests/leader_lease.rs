//! Leader election against a real API server, driven through the library:
//! two candidates racing on one Lease never both lead, and a candidate takes
//! over only after the holder stops renewing.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use vmstream_operator::leader::LeaderElection;
use vmstream_testenv::require_control_plane;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_candidates_never_both_lead_and_takeover_waits_for_expiry() {
    let cp = require_control_plane!(
        "operator::racing_candidates_never_both_lead_and_takeover_waits_for_expiry"
    );
    let ns = cp.namespace("op-elect").await.expect("namespace");
    let client = cp.client().await.expect("client");
    let leases: Api<Lease> = Api::namespaced(client, ns.name());
    let duration = Duration::from_secs(2);
    let mut a = LeaderElection::new(leases.clone(), "race", "a", duration);
    let mut b = LeaderElection::new(leases.clone(), "race", "b", duration);

    // Both race from the very first round (the Lease does not exist yet).
    let mut leaders = Vec::new();
    for _ in 0..20 {
        let (ra, rb) = tokio::join!(a.try_acquire_or_renew(), b.try_acquire_or_renew());
        let (ra, rb) = (ra.expect("round a"), rb.expect("round b"));
        assert!(!(ra && rb), "both candidates believe they lead");
        leaders.push(if ra {
            "a"
        } else if rb {
            "b"
        } else {
            "-"
        });
    }
    let first = leaders
        .iter()
        .find(|l| **l != "-")
        .copied()
        .expect("someone leads");
    // Once someone leads and keeps renewing, leadership never flips.
    let from = leaders.iter().position(|l| *l == first).unwrap();
    assert!(
        leaders[from..].iter().all(|l| *l == first || *l == "-"),
        "{leaders:?}"
    );
    let (holder, standby) = if first == "a" {
        (a, &mut b)
    } else {
        (b, &mut a)
    };

    // The holder stops renewing: the standby waits out the duration by its
    // own clock, then takes over; never before renewTime + duration.
    let last_renew = leases
        .get("race")
        .await
        .unwrap()
        .spec
        .unwrap()
        .renew_time
        .unwrap()
        .0;
    loop {
        if standby.try_acquire_or_renew().await.expect("standby round") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took_over = Timestamp::now();
    assert!(
        took_over >= last_renew + SignedDuration::try_from(duration).unwrap(),
        "took over at {took_over}, before the Lease renewed at {last_renew} could expire"
    );
    let lease = leases.get("race").await.unwrap().spec.unwrap();
    assert_eq!(lease.holder_identity.as_deref(), Some(standby.identity()));
    assert_eq!(lease.lease_transitions, Some(1));
    drop(holder);
}
