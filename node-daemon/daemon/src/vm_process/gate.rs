//! Which request a VM process admits in which phase ([`admit`]), and the
//! [`MailboxGate`] counting mailbox calls so a migration can wait for them
//! (pure: no I/O, no waiting).

use crate::vm_protocol::{Request, VmPhase};

/// Whether `request` may run in `phase` (`migrating`: a migration of this
/// VM is under way); the error names why not.
pub fn admit(phase: &VmPhase, migrating: bool, request: &Request) -> Result<(), String> {
    use VmPhase::*;
    let allowed = match request {
        Request::Ping | Request::Stats | Request::Stop | Request::WaitRunning { .. } => true,
        Request::Start { .. } => *phase == Warm,
        Request::Pause | Request::Mailbox { .. } => *phase == Running,
        Request::Resume => *phase == Paused,
        Request::Capture { .. } | Request::Reclaim { .. } => matches!(phase, Running | Paused),
        Request::Receive { .. } => *phase == Warm,
        Request::Migrate { .. } => *phase == Running,
    };
    if !allowed {
        return Err(format!(
            "{} refused: the VM is {}",
            request.name(),
            phase_name(phase)
        ));
    }
    // While migrating the VM is paused and resumed by the migration and its
    // state is saved: nothing else may run in it or change it.
    let refused_while_migrating = matches!(
        request,
        Request::Mailbox { .. }
            | Request::Pause
            | Request::Resume
            | Request::Capture { .. }
            | Request::Reclaim { .. }
            | Request::Migrate { .. }
    );
    if migrating && refused_while_migrating {
        return Err(format!("{} refused: the VM is migrating", request.name()));
    }
    Ok(())
}

/// Mailbox calls and migrations of one VM, kept under the VM's core lock
/// (pure: no I/O, no waiting). A mailbox call is counted from its admission
/// (same lock hold) until its answer or failure; a migration closes the
/// gate, then waits until [`MailboxGate::drained`] before it pauses the VM.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MailboxGate {
    migrating: bool,
    in_flight: usize,
}

impl MailboxGate {
    /// Whether a migration has closed the gate.
    pub fn migrating(&self) -> bool {
        self.migrating
    }

    /// Mailbox calls admitted and not finished.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Admits `request` in `phase`; an admitted mailbox call is counted
    /// (the caller must [`MailboxGate::leave`] when it finished).
    pub fn admit(&mut self, phase: &VmPhase, request: &Request) -> Result<(), String> {
        admit(phase, self.migrating, request)?;
        if matches!(request, Request::Mailbox { .. }) {
            self.in_flight += 1;
        }
        Ok(())
    }

    /// A counted mailbox call finished (answered, timed out or failed).
    pub fn leave(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    /// Closes the gate for a migration of a VM in `phase`: from now on
    /// mailbox requests are refused. Refused itself unless the VM runs
    /// and no other migration is under way.
    pub fn begin_migration(&mut self, phase: &VmPhase) -> Result<(), String> {
        if *phase != VmPhase::Running {
            return Err(format!("migrate refused: the VM is {}", phase_name(phase)));
        }
        if self.migrating {
            return Err("migrate refused: the VM is migrating".into());
        }
        self.migrating = true;
        Ok(())
    }

    /// No mailbox call is in flight: the VM may be paused and saved.
    pub fn drained(&self) -> bool {
        self.in_flight == 0
    }

    /// The migration ended (it failed before the switch-over and the VM
    /// runs here again, or the phase already refuses mailbox requests).
    pub fn end_migration(&mut self) {
        self.migrating = false;
    }
}

pub(super) fn phase_name(phase: &VmPhase) -> &'static str {
    match phase {
        VmPhase::Warm => "warm (not started)",
        VmPhase::Starting => "starting",
        VmPhase::Running => "running",
        VmPhase::Paused => "paused",
        VmPhase::Failed => "failed",
        VmPhase::Stopping => "stopping",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm_protocol::{CloneBackend, StartSpec};

    #[test]
    fn admission_by_phase() {
        let start = Request::Start {
            spec: StartSpec::Clone {
                image: "/i".into(),
                backend: CloneBackend::Lazy,
                network: None,
            },
        };
        assert!(admit(&VmPhase::Warm, false, &start).is_ok());
        let e = admit(&VmPhase::Running, false, &start).unwrap_err();
        assert_eq!(e, "start refused: the VM is running");
        assert!(admit(&VmPhase::Running, false, &Request::Pause).is_ok());
        assert!(admit(&VmPhase::Paused, false, &Request::Pause).is_err());
        assert!(admit(&VmPhase::Paused, false, &Request::Resume).is_ok());
        assert!(
            admit(
                &VmPhase::Warm,
                false,
                &Request::Capture { dir: "/d".into() }
            )
            .is_err()
        );
        assert!(
            admit(
                &VmPhase::Paused,
                false,
                &Request::Capture { dir: "/d".into() }
            )
            .is_ok()
        );
        let reclaim = Request::Reclaim { max_bytes: 1 };
        assert!(admit(&VmPhase::Running, false, &reclaim).is_ok());
        assert!(admit(&VmPhase::Paused, false, &reclaim).is_ok());
        assert_eq!(
            admit(&VmPhase::Warm, false, &reclaim).unwrap_err(),
            "reclaim refused: the VM is warm (not started)"
        );
        let ask = Request::Mailbox {
            request: 1,
            timeout_ms: None,
        };
        assert!(admit(&VmPhase::Paused, false, &ask).is_err());
        for phase in [
            VmPhase::Warm,
            VmPhase::Starting,
            VmPhase::Failed,
            VmPhase::Stopping,
        ] {
            assert!(admit(&phase, false, &Request::Stop).is_ok());
            assert!(admit(&phase, false, &Request::Stats).is_ok());
        }
    }

    fn ask(n: u64) -> Request {
        Request::Mailbox {
            request: n,
            timeout_ms: None,
        }
    }

    #[test]
    fn a_migrating_vm_refuses_what_would_touch_it() {
        let running = VmPhase::Running;
        assert_eq!(
            admit(&running, true, &ask(1)).unwrap_err(),
            "mailbox refused: the VM is migrating"
        );
        for refused in [
            Request::Pause,
            Request::Capture { dir: "/d".into() },
            Request::Reclaim { max_bytes: 1 },
        ] {
            assert!(admit(&running, true, &refused).is_err(), "{refused:?}");
        }
        assert!(admit(&VmPhase::Paused, true, &Request::Resume).is_err());
        for allowed in [Request::Ping, Request::Stats, Request::Stop] {
            assert!(admit(&running, true, &allowed).is_ok(), "{allowed:?}");
        }
        // The phase's refusal is named first.
        assert_eq!(
            admit(&VmPhase::Stopping, true, &ask(1)).unwrap_err(),
            "mailbox refused: the VM is stopping"
        );
    }

    #[test]
    fn the_gate_counts_mailbox_calls_and_refuses_them_while_migrating() {
        let running = VmPhase::Running;
        let mut gate = MailboxGate::default();
        gate.admit(&running, &ask(1)).unwrap();
        gate.admit(&running, &ask(2)).unwrap();
        gate.admit(&running, &Request::Stats).unwrap();
        assert_eq!(gate.in_flight(), 2, "only mailbox calls are counted");
        // A refused call is not counted.
        assert!(gate.admit(&VmPhase::Paused, &ask(3)).is_err());
        assert_eq!(gate.in_flight(), 2);

        gate.begin_migration(&running).unwrap();
        assert!(gate.migrating());
        assert!(!gate.drained(), "two calls still in flight");
        assert_eq!(
            gate.admit(&running, &ask(4)).unwrap_err(),
            "mailbox refused: the VM is migrating"
        );
        assert_eq!(gate.in_flight(), 2);
        assert_eq!(
            gate.begin_migration(&running).unwrap_err(),
            "migrate refused: the VM is migrating"
        );
        gate.leave();
        assert!(!gate.drained());
        gate.leave();
        assert!(gate.drained());

        // Failed before the switch-over: requests are admitted again.
        gate.end_migration();
        assert!(!gate.migrating());
        gate.admit(&running, &ask(5)).unwrap();
        assert_eq!(gate.in_flight(), 1);
        gate.leave();
        gate.leave();
        assert_eq!(gate.in_flight(), 0, "never below zero");

        assert_eq!(
            gate.begin_migration(&VmPhase::Paused).unwrap_err(),
            "migrate refused: the VM is paused"
        );
        assert!(!gate.migrating());
    }
}
