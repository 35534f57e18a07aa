//! Model-specific registers: which ones a vCPU's state covers and how a
//! partial KVM_GET_MSRS/KVM_SET_MSRS is continued past entries the host
//! refuses (KVM processes a list in order and stops at the first failure).

/// Result of applying an MSR list entry by entry through a batch operation.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MsrBatchOutcome {
    /// Indices processed successfully, in order.
    pub accepted: Vec<u32>,
    /// Indices the host refused.
    pub refused: Vec<u32>,
}

/// Runs `batch` over `indices` in ranges of at most `max_batch` entries;
/// `batch` returns how many leading entries of its range it processed (KVM
/// semantics). On a short count the entry at that position is recorded as
/// refused and processing continues after it. An `Err` from `batch` stops
/// processing and is returned.
pub fn apply_skipping_refused<E>(
    indices: &[u32],
    max_batch: usize,
    mut batch: impl FnMut(std::ops::Range<usize>) -> Result<usize, E>,
) -> Result<MsrBatchOutcome, E> {
    let mut outcome = MsrBatchOutcome::default();
    let mut start = 0;
    while start < indices.len() {
        let end = indices.len().min(start + max_batch.max(1));
        let done = batch(start..end)?.min(end - start);
        outcome
            .accepted
            .extend_from_slice(&indices[start..start + done]);
        start += done;
        if start < end {
            outcome.refused.push(indices[start]);
            start += 1;
        }
    }
    Ok(outcome)
}

/// MSR_IA32_TSC_DEADLINE: must be restored after the TSC and LAPIC.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// MSR_IA32_TSC.
pub const MSR_IA32_TSC: u32 = 0x10;

/// Orders MSRs for restore: everything else first, then the TSC, then the
/// TSC deadline (which is relative to the TSC).
pub fn restore_order(indices: &mut [u32]) {
    indices.sort_by_key(|&index| match index {
        MSR_IA32_TSC => 1,
        MSR_IA32_TSC_DEADLINE => 2,
        _ => 0,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_refused_entries_and_continues() {
        let indices = [1, 2, 0x10a, 4, 5];
        let outcome = apply_skipping_refused::<()>(&indices, 256, |range| {
            // Refuses 0x10a wherever it appears in the batch.
            let len = range.len();
            Ok(indices[range]
                .iter()
                .position(|&i| i == 0x10a)
                .unwrap_or(len))
        })
        .unwrap();
        assert_eq!(outcome.accepted, vec![1, 2, 4, 5]);
        assert_eq!(outcome.refused, vec![0x10a]);
    }

    #[test]
    fn all_refused_terminates() {
        let indices = [7, 8, 9];
        let outcome = apply_skipping_refused::<()>(&indices, 256, |_| Ok(0)).unwrap();
        assert!(outcome.accepted.is_empty());
        assert_eq!(outcome.refused, vec![7, 8, 9]);
    }

    #[test]
    fn errors_stop_processing() {
        let result = apply_skipping_refused(&[1, 2], 256, |_| Err("ioctl failed"));
        assert_eq!(result, Err("ioctl failed"));
    }

    #[test]
    fn long_lists_are_split_into_batches_without_refusals() {
        let indices: Vec<u32> = (0..600).collect();
        let mut calls = 0;
        let outcome = apply_skipping_refused::<()>(&indices, 256, |range| {
            calls += 1;
            assert!(range.len() <= 256);
            Ok(range.len())
        })
        .unwrap();
        assert_eq!(outcome.accepted.len(), 600);
        assert!(outcome.refused.is_empty());
        assert_eq!(calls, 3);
    }

    #[test]
    fn tsc_deadline_comes_last() {
        let mut indices = [MSR_IA32_TSC_DEADLINE, 0x174, MSR_IA32_TSC, 0xc0000080];
        restore_order(&mut indices);
        assert_eq!(
            indices,
            [0x174, 0xc0000080, MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE]
        );
    }
}
