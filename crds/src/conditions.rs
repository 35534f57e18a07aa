//! Builders and update rules for the standard `metav1.Condition` list that every
//! vmstream status carries.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// A condition of type `type_` stamped with the current time.
///
/// `generation` is the `metadata.generation` the condition was computed from
/// (0 when unknown).
pub fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if status { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message: message.to_owned(),
        observed_generation: generation,
        last_transition_time: Time(Timestamp::now()),
    }
}

/// Put `new` into `conditions`, replacing the condition of the same type.
///
/// The previous `lastTransitionTime` is kept when the status did not change, so
/// the time says when the condition last flipped, not when it was last written.
/// Returns whether anything other than the timestamp changed.
pub fn set_condition(conditions: &mut Vec<Condition>, new: Condition) -> bool {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        None => {
            conditions.push(new);
            true
        }
        Some(old) => {
            let changed = old.status != new.status
                || old.reason != new.reason
                || old.message != new.message
                || old.observed_generation != new.observed_generation;
            let transition_time = if old.status == new.status {
                old.last_transition_time.clone()
            } else {
                new.last_transition_time.clone()
            };
            *old = Condition {
                last_transition_time: transition_time,
                ..new
            };
            changed
        }
    }
}

/// The condition of type `type_`, if present.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition of type `type_` is present with status `True`.
pub fn is_condition_true(conditions: &[Condition], type_: &str) -> bool {
    find_condition(conditions, type_).is_some_and(|c| c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(c: Condition, secs: i64) -> Condition {
        Condition {
            last_transition_time: Time(Timestamp::from_second(secs).unwrap()),
            ..c
        }
    }

    #[test]
    fn builder_fills_every_field() {
        let c = condition("Ready", true, "Captured", "image captured", Some(3));
        assert_eq!(c.type_, "Ready");
        assert_eq!(c.status, "True");
        assert_eq!(c.reason, "Captured");
        assert_eq!(c.message, "image captured");
        assert_eq!(c.observed_generation, Some(3));
        assert_eq!(condition("Ready", false, "R", "m", None).status, "False");
    }

    #[test]
    fn unchanged_status_keeps_transition_time() {
        let mut list = vec![at(condition("Ready", true, "A", "a", Some(1)), 100)];
        let changed = set_condition(
            &mut list,
            at(condition("Ready", true, "A", "a", Some(1)), 200),
        );
        assert!(!changed);
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].last_transition_time.0.as_second(), 100);
    }

    #[test]
    fn flipped_status_takes_new_transition_time() {
        let mut list = vec![at(condition("Ready", true, "A", "a", Some(1)), 100)];
        let changed = set_condition(
            &mut list,
            at(condition("Ready", false, "B", "b", Some(2)), 200),
        );
        assert!(changed);
        assert_eq!(list[0].last_transition_time.0.as_second(), 200);
        assert_eq!(list[0].status, "False");
        assert!(!is_condition_true(&list, "Ready"));
    }

    #[test]
    fn new_type_is_appended() {
        let mut list = vec![condition("Ready", true, "A", "a", None)];
        assert!(set_condition(
            &mut list,
            condition("Scheduled", true, "B", "b", None)
        ));
        assert_eq!(list.len(), 2);
        assert!(is_condition_true(&list, "Scheduled"));
        assert!(find_condition(&list, "Missing").is_none());
    }
}
