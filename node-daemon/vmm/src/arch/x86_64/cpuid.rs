//! Per-vCPU CPUID: the host's KVM_GET_SUPPORTED_CPUID with the vCPU's APIC
//! IDs filled in and the hypervisor bit set.

use kvm_bindings::kvm_cpuid_entry2;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_EXTENDED_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXTENDED_TOPOLOGY: u32 = 0x1f;
const ECX_HYPERVISOR: u32 = 1 << 31;

/// Adjusts supported CPUID entries for vCPU `index` of `count` vCPUs.
pub fn patch_for_vcpu(entries: &mut [kvm_cpuid_entry2], index: u8, count: u8) {
    for entry in entries.iter_mut() {
        match entry.function {
            LEAF_FEATURES => {
                entry.ebx = (entry.ebx & 0x0000_ffff)
                    | (u32::from(index) << 24)
                    | (u32::from(count.max(1)) << 16);
                entry.ecx |= ECX_HYPERVISOR;
            }
            LEAF_EXTENDED_TOPOLOGY | LEAF_V2_EXTENDED_TOPOLOGY => {
                entry.edx = u32::from(index);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_apic_id_and_hypervisor_bit() {
        let mut entries = vec![
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xff00_0800,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                edx: 7,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x7,
                ebx: 0x1234,
                ..Default::default()
            },
        ];
        patch_for_vcpu(&mut entries, 1, 2);
        assert_eq!(entries[0].ebx >> 24, 1);
        assert_eq!((entries[0].ebx >> 16) & 0xff, 2);
        assert_eq!(entries[0].ebx & 0xffff, 0x0800);
        assert_ne!(entries[0].ecx & ECX_HYPERVISOR, 0);
        assert_eq!(entries[1].edx, 1);
        assert_eq!(entries[2].ebx, 0x1234);
    }
}
