//! Per-vCPU CPUID: the host's KVM_GET_SUPPORTED_CPUID with the vCPU's APIC
//! IDs filled in and the hypervisor bit set, and CPU templates that decide
//! which of the host's features a guest kernel may see.
//!
//! [`CpuTemplate::Emulated`] is for hosts whose KVM emulates every guest
//! instruction (kvm_pvm without PVM guest support): its instruction
//! emulator cannot execute CMPXCHG16B, XSAVE/XRSTOR, CLAC/STAC, POPCNT or
//! most of SSE3 and later, so a guest that is told those exist stops with an
//! emulation failure. The template hides them (and everything built on
//! them) and claims GenuineIntel, which keeps Linux off AMD's FXSAVE-leak
//! path (it runs `fnclex`, which the emulator lacks either).

use kvm_bindings::kvm_cpuid_entry2;

const LEAF_VENDOR: u32 = 0x0;
const LEAF_FEATURES: u32 = 0x1;
const LEAF_EXTENDED_TOPOLOGY: u32 = 0xb;
const LEAF_XSAVE_STATE: u32 = 0xd;
const LEAF_V2_EXTENDED_TOPOLOGY: u32 = 0x1f;
const ECX_HYPERVISOR: u32 = 1 << 31;

/// "GenuineIntel" as leaf 0 returns it in EBX, EDX, ECX.
const GENUINE_INTEL: [u32; 3] = [0x756e_6547, 0x4965_6e69, 0x6c65_746e];

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

/// Which host CPU features a guest sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuTemplate {
    /// Everything KVM supports (hardware-virtualising hosts).
    #[default]
    Host,
    /// Only what KVM's instruction emulator can execute, vendor GenuineIntel
    /// (kvm_pvm hosts, where no guest instruction runs natively).
    Emulated,
}

/// A CPUID register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// One feature the emulated template hides: where its bit is and the name
/// Linux's `clearcpuid=` knows it by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HiddenFeature {
    pub name: &'static str,
    pub leaf: u32,
    pub subleaf: u32,
    pub reg: Reg,
    pub bit: u8,
}

const fn hide(name: &'static str, leaf: u32, subleaf: u32, reg: Reg, bit: u8) -> HiddenFeature {
    HiddenFeature {
        name,
        leaf,
        subleaf,
        reg,
        bit,
    }
}

/// The features [`CpuTemplate::Emulated`] hides.
pub const EMULATED_HIDDEN: &[HiddenFeature] = &[
    hide("pni", 1, 0, Reg::Ecx, 0),
    hide("pclmulqdq", 1, 0, Reg::Ecx, 1),
    hide("ssse3", 1, 0, Reg::Ecx, 9),
    hide("fma", 1, 0, Reg::Ecx, 12),
    hide("cx16", 1, 0, Reg::Ecx, 13),
    hide("pcid", 1, 0, Reg::Ecx, 17),
    hide("sse4_1", 1, 0, Reg::Ecx, 19),
    hide("sse4_2", 1, 0, Reg::Ecx, 20),
    hide("movbe", 1, 0, Reg::Ecx, 22),
    hide("popcnt", 1, 0, Reg::Ecx, 23),
    hide("aes", 1, 0, Reg::Ecx, 25),
    hide("xsave", 1, 0, Reg::Ecx, 26),
    hide("osxsave", 1, 0, Reg::Ecx, 27),
    hide("avx", 1, 0, Reg::Ecx, 28),
    hide("f16c", 1, 0, Reg::Ecx, 29),
    hide("rdrand", 1, 0, Reg::Ecx, 30),
    hide("fsgsbase", 7, 0, Reg::Ebx, 0),
    hide("bmi1", 7, 0, Reg::Ebx, 3),
    hide("hle", 7, 0, Reg::Ebx, 4),
    hide("avx2", 7, 0, Reg::Ebx, 5),
    hide("smep", 7, 0, Reg::Ebx, 7),
    hide("bmi2", 7, 0, Reg::Ebx, 8),
    hide("invpcid", 7, 0, Reg::Ebx, 10),
    hide("rtm", 7, 0, Reg::Ebx, 11),
    hide("avx512f", 7, 0, Reg::Ebx, 16),
    hide("avx512dq", 7, 0, Reg::Ebx, 17),
    hide("rdseed", 7, 0, Reg::Ebx, 18),
    hide("adx", 7, 0, Reg::Ebx, 19),
    hide("smap", 7, 0, Reg::Ebx, 20),
    hide("avx512ifma", 7, 0, Reg::Ebx, 21),
    hide("clflushopt", 7, 0, Reg::Ebx, 23),
    hide("clwb", 7, 0, Reg::Ebx, 24),
    hide("avx512cd", 7, 0, Reg::Ebx, 28),
    hide("sha_ni", 7, 0, Reg::Ebx, 29),
    hide("avx512bw", 7, 0, Reg::Ebx, 30),
    hide("avx512vl", 7, 0, Reg::Ebx, 31),
    hide("avx512vbmi", 7, 0, Reg::Ecx, 1),
    hide("umip", 7, 0, Reg::Ecx, 2),
    hide("pku", 7, 0, Reg::Ecx, 3),
    hide("ospke", 7, 0, Reg::Ecx, 4),
    hide("waitpkg", 7, 0, Reg::Ecx, 5),
    hide("avx512_vbmi2", 7, 0, Reg::Ecx, 6),
    hide("gfni", 7, 0, Reg::Ecx, 8),
    hide("vaes", 7, 0, Reg::Ecx, 9),
    hide("vpclmulqdq", 7, 0, Reg::Ecx, 10),
    hide("avx512_vnni", 7, 0, Reg::Ecx, 11),
    hide("avx512_bitalg", 7, 0, Reg::Ecx, 12),
    hide("avx512_vpopcntdq", 7, 0, Reg::Ecx, 14),
    hide("la57", 7, 0, Reg::Ecx, 16),
    hide("rdpid", 7, 0, Reg::Ecx, 22),
    hide("movdiri", 7, 0, Reg::Ecx, 27),
    hide("movdir64b", 7, 0, Reg::Ecx, 28),
    hide("avx512_4vnniw", 7, 0, Reg::Edx, 2),
    hide("avx512_4fmaps", 7, 0, Reg::Edx, 3),
    hide("avx512_vp2intersect", 7, 0, Reg::Edx, 8),
    hide("serialize", 7, 0, Reg::Edx, 14),
    hide("amx_bf16", 7, 0, Reg::Edx, 22),
    hide("amx_tile", 7, 0, Reg::Edx, 24),
    hide("amx_int8", 7, 0, Reg::Edx, 25),
    hide("avx_vnni", 7, 1, Reg::Eax, 4),
    hide("avx512_bf16", 7, 1, Reg::Eax, 5),
    hide("abm", 0x8000_0001, 0, Reg::Ecx, 5),
    hide("sse4a", 0x8000_0001, 0, Reg::Ecx, 6),
    hide("misalignsse", 0x8000_0001, 0, Reg::Ecx, 7),
    hide("xop", 0x8000_0001, 0, Reg::Ecx, 11),
    hide("fma4", 0x8000_0001, 0, Reg::Ecx, 16),
    hide("tbm", 0x8000_0001, 0, Reg::Ecx, 21),
    hide("rdtscp", 0x8000_0001, 0, Reg::Edx, 27),
];

/// What the emulated template passes to Linux's `clearcpuid=`, most
/// important first: the features a guest was seen using although CPUID hid
/// them (KVM on PVM hosts forces some on), then instructions the kernel
/// patches in by feature that the emulator cannot run, then the rest. Linux
/// reads at most [`CLEARCPUID_MAX`] characters of the value, so the list is
/// cut there.
const KERNEL_CLEARED: &[&str] = &[
    "smap",
    "xsave",
    "popcnt",
    "cx16",
    "fsgsbase",
    "rdpid",
    "rdtscp",
    "pcid",
    "invpcid",
    "rdrand",
    "rdseed",
    "smep",
    "umip",
    "avx",
    "avx2",
    "avx512f",
    "osxsave",
    "clflushopt",
    "clwb",
    "pni",
    "ssse3",
    "sse4_1",
    "sse4_2",
    "movbe",
    "aes",
    "pclmulqdq",
    "fma",
    "f16c",
    "bmi1",
    "bmi2",
    "adx",
    "abm",
    "sha_ni",
    "gfni",
    "vaes",
    "vpclmulqdq",
];

/// Longest `clearcpuid=` value Linux reads (its buffer is 128 bytes).
pub const CLEARCPUID_MAX: usize = 127;

impl HiddenFeature {
    /// The feature's number in Linux's capability words (`word * 32 +
    /// bit`), which `clearcpuid=` takes whatever the kernel's
    /// configuration (feature names need `CONFIG_X86_FEATURE_NAMES`, which
    /// small kernels lack). `None` for registers Linux keeps in words whose
    /// numbering changed between versions.
    pub fn linux_bit(&self) -> Option<u32> {
        let word = match (self.leaf, self.subleaf, self.reg) {
            (1, 0, Reg::Edx) => 0,
            (0x8000_0001, 0, Reg::Edx) => 1,
            (1, 0, Reg::Ecx) => 4,
            (0x8000_0001, 0, Reg::Ecx) => 6,
            (7, 0, Reg::Ebx) => 9,
            (7, 0, Reg::Ecx) => 16,
            (7, 0, Reg::Edx) => 18,
            _ => return None,
        };
        Some(word * 32 + u32::from(self.bit))
    }
}

/// The `clearcpuid=` value: Linux bit numbers of [`KERNEL_CLEARED`] in
/// order, as many as fit in [`CLEARCPUID_MAX`] characters.
fn clearcpuid_value() -> String {
    let mut value = String::new();
    let bits = KERNEL_CLEARED.iter().filter_map(|name| {
        EMULATED_HIDDEN
            .iter()
            .find(|f| f.name == *name)
            .and_then(HiddenFeature::linux_bit)
    });
    for bit in bits {
        let item = if value.is_empty() {
            bit.to_string()
        } else {
            format!(",{bit}")
        };
        if value.len() + item.len() > CLEARCPUID_MAX {
            break;
        }
        value.push_str(&item);
    }
    value
}

impl CpuTemplate {
    /// The template for a host: [`CpuTemplate::Host`] where the CPU
    /// virtualises in hardware (`vmx` or `svm` in `/proc/cpuinfo`) and
    /// kvm_pvm is not loaded, else [`CpuTemplate::Emulated`].
    pub fn for_host(hardware_virtualisation: bool, kvm_pvm_loaded: bool) -> Self {
        if hardware_virtualisation && !kvm_pvm_loaded {
            Self::Host
        } else {
            Self::Emulated
        }
    }

    /// [`CpuTemplate::for_host`] with the facts of this machine.
    pub fn detect() -> Self {
        Self::for_host(
            hardware_virtualisation(),
            std::path::Path::new("/sys/module/kvm_pvm").exists(),
        )
    }

    /// Kernel command-line switches that keep a Linux guest off what the
    /// template hides even where CPUID alone is not enough (empty for
    /// [`CpuTemplate::Host`]).
    pub fn kernel_switches(self) -> String {
        match self {
            Self::Host => String::new(),
            Self::Emulated => format!("noxsave nofsgsbase clearcpuid={}", clearcpuid_value()),
        }
    }

    /// `supported` (KVM_GET_SUPPORTED_CPUID) as a guest of this template
    /// should see it.
    pub fn apply(self, supported: &[kvm_cpuid_entry2]) -> Vec<kvm_cpuid_entry2> {
        let mut entries = supported.to_vec();
        if self == Self::Host {
            return entries;
        }
        for entry in &mut entries {
            if entry.function == LEAF_VENDOR {
                [entry.ebx, entry.edx, entry.ecx] = GENUINE_INTEL;
            }
            if entry.function == LEAF_XSAVE_STATE {
                // Without XSAVE there are no XSAVE state components.
                (entry.eax, entry.ebx, entry.ecx, entry.edx) = (0, 0, 0, 0);
            }
            for feature in EMULATED_HIDDEN {
                if feature.leaf == entry.function && feature.subleaf == entry.index {
                    *register(entry, feature.reg) &= !(1u32 << feature.bit);
                }
            }
        }
        entries
    }
}

fn register(entry: &mut kvm_cpuid_entry2, reg: Reg) -> &mut u32 {
    match reg {
        Reg::Eax => &mut entry.eax,
        Reg::Ebx => &mut entry.ebx,
        Reg::Ecx => &mut entry.ecx,
        Reg::Edx => &mut entry.edx,
    }
}

/// Whether `/proc/cpuinfo` lists `vmx` or `svm`.
fn hardware_virtualisation() -> bool {
    std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|info| {
        info.lines()
            .filter(|line| line.starts_with("flags"))
            .flat_map(|line| line.split_whitespace())
            .any(|flag| flag == "vmx" || flag == "svm")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, value: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: value,
            ebx: value,
            ecx: value,
            edx: value,
            ..Default::default()
        }
    }

    fn host_like() -> Vec<kvm_cpuid_entry2> {
        let mut vendor = entry(0, 0, 0);
        // "AuthenticAMD".
        (vendor.eax, vendor.ebx, vendor.edx, vendor.ecx) =
            (0x10, 0x6874_7541, 0x6974_6e65, 0x444d_4163);
        vec![
            vendor,
            entry(1, 0, u32::MAX),
            entry(7, 0, u32::MAX),
            entry(7, 1, u32::MAX),
            entry(0xd, 0, u32::MAX),
            entry(0xd, 1, u32::MAX),
            entry(0x8000_0001, 0, u32::MAX),
        ]
    }

    fn bit(entries: &[kvm_cpuid_entry2], leaf: u32, subleaf: u32, reg: Reg, bit: u8) -> bool {
        let mut e = *entries
            .iter()
            .find(|e| e.function == leaf && e.index == subleaf)
            .expect("leaf present");
        *register(&mut e, reg) & (1 << bit) != 0
    }

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

    #[test]
    fn emulated_template_hides_what_the_emulator_cannot_run() {
        let entries = CpuTemplate::Emulated.apply(&host_like());
        // (feature, leaf, subleaf, register, bit): the table the brief names.
        let hidden = [
            ("cx16", 1, 0, Reg::Ecx, 13),
            ("xsave", 1, 0, Reg::Ecx, 26),
            ("osxsave", 1, 0, Reg::Ecx, 27),
            ("avx", 1, 0, Reg::Ecx, 28),
            ("popcnt", 1, 0, Reg::Ecx, 23),
            ("sse3", 1, 0, Reg::Ecx, 0),
            ("ssse3", 1, 0, Reg::Ecx, 9),
            ("sse4.1", 1, 0, Reg::Ecx, 19),
            ("sse4.2", 1, 0, Reg::Ecx, 20),
            ("movbe", 1, 0, Reg::Ecx, 22),
            ("aes", 1, 0, Reg::Ecx, 25),
            ("pclmulqdq", 1, 0, Reg::Ecx, 1),
            ("rdrand", 1, 0, Reg::Ecx, 30),
            ("f16c", 1, 0, Reg::Ecx, 29),
            ("fma", 1, 0, Reg::Ecx, 12),
            ("pcid", 1, 0, Reg::Ecx, 17),
            ("fsgsbase", 7, 0, Reg::Ebx, 0),
            ("bmi1", 7, 0, Reg::Ebx, 3),
            ("avx2", 7, 0, Reg::Ebx, 5),
            ("smep", 7, 0, Reg::Ebx, 7),
            ("bmi2", 7, 0, Reg::Ebx, 8),
            ("invpcid", 7, 0, Reg::Ebx, 10),
            ("avx512f", 7, 0, Reg::Ebx, 16),
            ("rdseed", 7, 0, Reg::Ebx, 18),
            ("adx", 7, 0, Reg::Ebx, 19),
            ("smap", 7, 0, Reg::Ebx, 20),
            ("clflushopt", 7, 0, Reg::Ebx, 23),
            ("clwb", 7, 0, Reg::Ebx, 24),
            ("sha", 7, 0, Reg::Ebx, 29),
            ("umip", 7, 0, Reg::Ecx, 2),
            ("gfni", 7, 0, Reg::Ecx, 8),
            ("vaes", 7, 0, Reg::Ecx, 9),
            ("vpclmulqdq", 7, 0, Reg::Ecx, 10),
            ("rdpid", 7, 0, Reg::Ecx, 22),
            ("avx_vnni", 7, 1, Reg::Eax, 4),
            ("abm/lzcnt", 0x8000_0001, 0, Reg::Ecx, 5),
        ];
        for (name, leaf, subleaf, reg, b) in hidden {
            assert!(
                !bit(&entries, leaf, subleaf, reg, b),
                "{name} still visible"
            );
        }
        // (feature, leaf, subleaf, register, bit) that stay: the basics
        // Linux needs and the emulator runs.
        let kept = [
            ("fpu", 1, 0, Reg::Edx, 0),
            ("tsc", 1, 0, Reg::Edx, 4),
            ("apic", 1, 0, Reg::Edx, 9),
            ("sse2", 1, 0, Reg::Edx, 26),
            ("fxsr", 1, 0, Reg::Edx, 24),
            ("x2apic", 1, 0, Reg::Ecx, 21),
            ("erms", 7, 0, Reg::Ebx, 9),
            ("lm", 0x8000_0001, 0, Reg::Edx, 29),
            ("nx", 0x8000_0001, 0, Reg::Edx, 20),
        ];
        for (name, leaf, subleaf, reg, b) in kept {
            assert!(bit(&entries, leaf, subleaf, reg, b), "{name} was hidden");
        }
        let vendor = entries.iter().find(|e| e.function == 0).unwrap();
        assert_eq!([vendor.ebx, vendor.edx, vendor.ecx], GENUINE_INTEL);
        assert_eq!(vendor.eax, 0x10, "the highest leaf stays the host's");
        for leaf_d in entries.iter().filter(|e| e.function == 0xd) {
            assert_eq!(
                (leaf_d.eax, leaf_d.ebx, leaf_d.ecx, leaf_d.edx),
                (0, 0, 0, 0)
            );
        }
    }

    #[test]
    fn host_template_passes_everything_through() {
        let host = host_like();
        let entries = CpuTemplate::Host.apply(&host);
        assert_eq!(entries.len(), host.len());
        for (a, b) in entries.iter().zip(&host) {
            assert_eq!(
                (a.function, a.index, a.eax, a.ebx, a.ecx, a.edx),
                (b.function, b.index, b.eax, b.ebx, b.ecx, b.edx)
            );
        }
        assert_eq!(CpuTemplate::Host.kernel_switches(), "");
    }

    #[test]
    fn template_follows_the_host_kind() {
        // (vmx/svm in cpuinfo, kvm_pvm loaded) -> template
        let table = [
            (true, false, CpuTemplate::Host),
            (true, true, CpuTemplate::Emulated),
            (false, true, CpuTemplate::Emulated),
            (false, false, CpuTemplate::Emulated),
        ];
        for (hardware, pvm, expected) in table {
            assert_eq!(CpuTemplate::for_host(hardware, pvm), expected);
        }
    }

    #[test]
    fn emulated_switches_clear_the_riskiest_features_by_number_within_linuxs_limit() {
        let switches = CpuTemplate::Emulated.kernel_switches();
        assert!(switches.starts_with("noxsave nofsgsbase clearcpuid="));
        let value = switches.rsplit_once('=').unwrap().1;
        assert!(value.len() <= CLEARCPUID_MAX, "{} characters", value.len());
        let cleared: Vec<u32> = value.split(',').map(|n| n.parse().unwrap()).collect();
        // (feature, Linux's X86_FEATURE_* number)
        let table = [
            ("smap", 9 * 32 + 20),
            ("xsave", 4 * 32 + 26),
            ("popcnt", 4 * 32 + 23),
            ("cx16", 4 * 32 + 13),
            ("fsgsbase", 9 * 32),
            ("rdpid", 16 * 32 + 22),
            ("rdtscp", 32 + 27),
            ("pcid", 4 * 32 + 17),
            ("invpcid", 9 * 32 + 10),
            ("rdrand", 4 * 32 + 30),
            ("smep", 9 * 32 + 7),
            ("avx", 4 * 32 + 28),
        ];
        for (name, bit) in table {
            assert!(cleared.contains(&bit), "clearcpuid= lacks {name} ({bit})");
        }
        assert!(cleared.len() >= 25, "only {} features fit", cleared.len());
        for name in KERNEL_CLEARED {
            assert!(
                EMULATED_HIDDEN.iter().any(|f| f.name == *name),
                "{name} is cleared on the command line but visible in CPUID"
            );
        }
    }
}
