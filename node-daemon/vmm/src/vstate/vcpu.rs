//! One vCPU's KVM state: creation with per-vCPU CPUID, the long-mode boot
//! state, and save/restore of regs, sregs, FPU, XSAVE (XSAVE2 when the host
//! needs more than 4 KiB), XCRs, MSRs, LAPIC, MP state, vCPU events and debug
//! registers, in the orders KVM requires (Firecracker's orders).

use kvm_bindings::{
    CpuId, Msrs, Xsave, kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use super::vm::KvmHost;
use crate::arch::x86_64::{boot, cpuid, msr};

/// Largest MSR batch per ioctl (the FAM wrapper's limit).
const MSR_BATCH: usize = kvm_bindings::KVM_MAX_MSR_ENTRIES;
const XSAVE_REGION_WORDS: usize = 1024;

/// x87/SSE state as KVM_GET_FPU reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        Self {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(f: &FpuState) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// One MSR's saved value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrValue {
    pub index: u32,
    pub value: u64,
}

/// The complete state of one vCPU.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VcpuState {
    pub index: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: FpuState,
    /// The XSAVE area as 32-bit words (1024, or more with XSAVE2).
    pub xsave: Vec<u32>,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<MsrValue>,
    pub events: kvm_vcpu_events,
}

/// Error creating or configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuCreateError {
    #[error("KVM_CREATE_VCPU {index} failed")]
    Create {
        index: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM_SET_CPUID2 on vCPU {index} failed")]
    Cpuid {
        index: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Error setting a vCPU's boot state.
#[derive(Debug, thiserror::Error)]
#[error("{ioctl} on vCPU {index} failed while setting the boot state")]
pub struct VcpuBootError {
    pub index: u8,
    pub ioctl: &'static str,
    #[source]
    pub source: kvm_ioctls::Error,
}

/// Error saving a vCPU's state.
#[derive(Debug, thiserror::Error)]
#[error("{ioctl} on vCPU {index} failed while saving its state")]
pub struct VcpuSaveError {
    pub index: u8,
    pub ioctl: &'static str,
    #[source]
    pub source: kvm_ioctls::Error,
}

/// Error restoring a vCPU's state.
#[derive(Debug, thiserror::Error)]
pub enum VcpuRestoreError {
    #[error("{ioctl} on vCPU {index} failed while restoring its state")]
    Ioctl {
        index: u8,
        ioctl: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("saved XSAVE area of vCPU {index} has {saved} words, this host uses {host}")]
    XsaveSize {
        index: u8,
        saved: usize,
        host: usize,
    },
}

/// The CPUID of vCPU `index` of `count`.
pub fn vcpu_cpuid(host: &KvmHost, index: u8, count: u8) -> Vec<kvm_cpuid_entry2> {
    let mut entries = host.supported_cpuid().as_slice().to_vec();
    cpuid::patch_for_vcpu(&mut entries, index, count);
    entries
}

/// Creates vCPU `index` of `count` with its CPUID set.
pub fn create_vcpu(
    host: &KvmHost,
    vm: &VmFd,
    index: u8,
    count: u8,
) -> Result<VcpuFd, VcpuCreateError> {
    let fd = vm
        .create_vcpu(u64::from(index))
        .map_err(|source| VcpuCreateError::Create { index, source })?;
    let cpuid = CpuId::from_entries(&vcpu_cpuid(host, index, count))
        .expect("supported CPUID fits the FAM wrapper it came from");
    fd.set_cpuid2(&cpuid)
        .map_err(|source| VcpuCreateError::Cpuid { index, source })?;
    Ok(fd)
}

/// Puts vCPU `index` at the guest entry point in 64-bit long mode.
pub fn set_boot_state(fd: &VcpuFd, index: u8) -> Result<(), VcpuBootError> {
    let fail = |ioctl| {
        move |source| VcpuBootError {
            index,
            ioctl,
            source,
        }
    };
    let sregs = fd.get_sregs().map_err(fail("KVM_GET_SREGS"))?;
    fd.set_sregs(&boot::long_mode_sregs(sregs))
        .map_err(fail("KVM_SET_SREGS"))?;
    fd.set_regs(&boot::entry_regs(usize::from(index)))
        .map_err(fail("KVM_SET_REGS"))?;
    fd.set_fpu(&boot::entry_fpu())
        .map_err(fail("KVM_SET_FPU"))?;
    // Application processors would otherwise wait for INIT/SIPI.
    fd.set_mp_state(kvm_mp_state {
        mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
    })
    .map_err(fail("KVM_SET_MP_STATE"))?;
    Ok(())
}

/// LAPIC register offsets and delivery modes for the local interrupt lines.
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Puts vCPU `index` at a Linux kernel's 64-bit entry point: the CPUID of
/// its template, the micro guests' long-mode state with RIP = `entry` and
/// RSI = `zero_page`, and LAPIC LINT0/LINT1 wired as ExtINT/NMI (virtual
/// wire mode, as firmware leaves them) so the PIC's interrupts reach the
/// CPU before Linux sets up its APIC.
pub fn set_linux_boot_state(
    fd: &VcpuFd,
    index: u8,
    cpuid: &[kvm_cpuid_entry2],
    entry: u64,
    zero_page: u64,
) -> Result<(), VcpuBootError> {
    let fail = |ioctl| {
        move |source| VcpuBootError {
            index,
            ioctl,
            source,
        }
    };
    let cpuid = CpuId::from_entries(cpuid).map_err(|_| VcpuBootError {
        index,
        ioctl: "KVM_SET_CPUID2",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    fd.set_cpuid2(&cpuid).map_err(fail("KVM_SET_CPUID2"))?;
    let sregs = fd.get_sregs().map_err(fail("KVM_GET_SREGS"))?;
    fd.set_sregs(&boot::long_mode_sregs(sregs))
        .map_err(fail("KVM_SET_SREGS"))?;
    fd.set_regs(&boot::linux_entry_regs(entry, zero_page))
        .map_err(fail("KVM_SET_REGS"))?;
    fd.set_fpu(&boot::entry_fpu())
        .map_err(fail("KVM_SET_FPU"))?;
    let mut lapic = fd.get_lapic().map_err(fail("KVM_GET_LAPIC"))?;
    set_lvt_mode(&mut lapic, APIC_LVT_LINT0, APIC_MODE_EXTINT);
    set_lvt_mode(&mut lapic, APIC_LVT_LINT1, APIC_MODE_NMI);
    fd.set_lapic(&lapic).map_err(fail("KVM_SET_LAPIC"))?;
    fd.set_mp_state(kvm_mp_state {
        mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
    })
    .map_err(fail("KVM_SET_MP_STATE"))?;
    Ok(())
}

/// Sets the delivery mode (bits 8..11) of the LVT register at `offset`.
fn set_lvt_mode(lapic: &mut kvm_lapic_state, offset: usize, mode: u32) {
    let mut bytes = [0u8; 4];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = lapic.regs[offset + i] as u8;
    }
    let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
    for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
        lapic.regs[offset + i] = byte as _;
    }
}

fn xsave_words(host: &KvmHost) -> usize {
    if host.xsave2_size() > std::mem::size_of::<kvm_xsave>() {
        host.xsave2_size().div_ceil(4)
    } else {
        XSAVE_REGION_WORDS
    }
}

fn save_xsave(host: &KvmHost, fd: &VcpuFd, index: u8) -> Result<Vec<u32>, VcpuSaveError> {
    let words = xsave_words(host);
    if words == XSAVE_REGION_WORDS {
        let xsave = fd.get_xsave().map_err(|source| VcpuSaveError {
            index,
            ioctl: "KVM_GET_XSAVE",
            source,
        })?;
        return Ok(xsave.region.to_vec());
    }
    let mut xsave = Xsave::new(words - XSAVE_REGION_WORDS).expect("XSAVE2 size fits a FAM wrapper");
    // SAFETY: the wrapper was allocated with the size KVM_CAP_XSAVE2 reports,
    // and this process enables no XSTATE features dynamically.
    unsafe { fd.get_xsave2(&mut xsave) }.map_err(|source| VcpuSaveError {
        index,
        ioctl: "KVM_GET_XSAVE2",
        source,
    })?;
    let mut out = xsave.as_fam_struct_ref().xsave.region.to_vec();
    out.extend_from_slice(xsave.as_slice());
    Ok(out)
}

fn restore_xsave(
    host: &KvmHost,
    fd: &VcpuFd,
    index: u8,
    saved: &[u32],
) -> Result<(), VcpuRestoreError> {
    let words = xsave_words(host);
    if saved.len() != words {
        return Err(VcpuRestoreError::XsaveSize {
            index,
            saved: saved.len(),
            host: words,
        });
    }
    let fail = |source| VcpuRestoreError::Ioctl {
        index,
        ioctl: "KVM_SET_XSAVE",
        source,
    };
    if words == XSAVE_REGION_WORDS {
        let mut xsave = kvm_xsave::default();
        xsave.region.copy_from_slice(saved);
        // SAFETY: no XSTATE features are enabled dynamically, so KVM reads
        // only the 4 KiB legacy structure.
        return unsafe { fd.set_xsave(&xsave) }.map_err(fail);
    }
    let mut xsave = Xsave::new(words - XSAVE_REGION_WORDS).expect("XSAVE2 size fits a FAM wrapper");
    // SAFETY: only the fixed-size region is written; the FAM length is left
    // as allocated.
    unsafe { xsave.as_mut_fam_struct() }
        .xsave
        .region
        .copy_from_slice(&saved[..XSAVE_REGION_WORDS]);
    xsave
        .as_mut_slice()
        .copy_from_slice(&saved[XSAVE_REGION_WORDS..]);
    // SAFETY: the wrapper holds exactly the size KVM_CAP_XSAVE2 reports.
    unsafe { fd.set_xsave2(&xsave) }.map_err(fail)
}

fn msr_batch(entries: &[kvm_msr_entry]) -> Msrs {
    Msrs::from_entries(entries).expect("MSR batch is at most KVM_MAX_MSR_ENTRIES")
}

fn save_msrs(host: &KvmHost, fd: &VcpuFd, index: u8) -> Result<Vec<MsrValue>, VcpuSaveError> {
    let indices = host.msr_indices();
    let mut values = Vec::with_capacity(indices.len());
    let outcome = msr::apply_skipping_refused(indices, MSR_BATCH, |range| {
        let entries: Vec<_> = indices[range]
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = msr_batch(&entries);
        let read = fd.get_msrs(&mut msrs)?;
        values.extend(msrs.as_slice()[..read].iter().map(|e| MsrValue {
            index: e.index,
            value: e.data,
        }));
        Ok(read)
    })
    .map_err(|source| VcpuSaveError {
        index,
        ioctl: "KVM_GET_MSRS",
        source,
    })?;
    if !outcome.refused.is_empty() {
        tracing::debug!(vcpu = index, refused = ?outcome.refused, "MSRs the host does not let us read are not saved");
    }
    Ok(values)
}

/// MSRs the host refused on restore (they keep their reset values).
pub type RefusedMsrs = Vec<u32>;

fn restore_msrs(
    fd: &VcpuFd,
    index: u8,
    saved: &[MsrValue],
) -> Result<RefusedMsrs, VcpuRestoreError> {
    let mut ordered = saved.to_vec();
    let mut indices: Vec<u32> = ordered.iter().map(|m| m.index).collect();
    msr::restore_order(&mut indices);
    ordered.sort_by_key(|m| indices.iter().position(|&i| i == m.index));
    let entries: Vec<kvm_msr_entry> = ordered
        .iter()
        .map(|m| kvm_msr_entry {
            index: m.index,
            data: m.value,
            ..Default::default()
        })
        .collect();
    let outcome = msr::apply_skipping_refused(&indices, MSR_BATCH, |range| {
        fd.set_msrs(&msr_batch(&entries[range]))
    })
    .map_err(|source| VcpuRestoreError::Ioctl {
        index,
        ioctl: "KVM_SET_MSRS",
        source,
    })?;
    if !outcome.refused.is_empty() {
        tracing::warn!(vcpu = index, refused = ?outcome.refused, "host refused to restore some MSRs; they keep their reset values");
    }
    Ok(outcome.refused)
}

/// Saves the state of a paused vCPU. KVM_GET_MP_STATE comes first (it may
/// change LAPIC state), vCPU events last.
pub fn save_vcpu(host: &KvmHost, fd: &VcpuFd, index: u8) -> Result<VcpuState, VcpuSaveError> {
    let fail = |ioctl| {
        move |source| VcpuSaveError {
            index,
            ioctl,
            source,
        }
    };
    let mp_state = fd.get_mp_state().map_err(fail("KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(fail("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(fail("KVM_GET_SREGS"))?;
    let fpu = FpuState::from(&fd.get_fpu().map_err(fail("KVM_GET_FPU"))?);
    let xsave = save_xsave(host, fd, index)?;
    let xcrs = fd.get_xcrs().map_err(fail("KVM_GET_XCRS"))?;
    let debug_regs = fd.get_debug_regs().map_err(fail("KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(fail("KVM_GET_LAPIC"))?;
    let cpuid = fd
        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(fail("KVM_GET_CPUID2"))?
        .as_slice()
        .to_vec();
    let msrs = save_msrs(host, fd, index)?;
    let events = fd.get_vcpu_events().map_err(fail("KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState {
        index,
        cpuid,
        mp_state,
        regs,
        sregs,
        fpu,
        xsave,
        xcrs,
        debug_regs,
        lapic,
        msrs,
        events,
    })
}

/// Restores a saved state into a vCPU that has not run since its creation
/// with the same CPUID. Returns the MSRs the host refused.
pub fn restore_vcpu(
    host: &KvmHost,
    fd: &VcpuFd,
    state: &VcpuState,
) -> Result<RefusedMsrs, VcpuRestoreError> {
    let index = state.index;
    let fail = |ioctl| {
        move |source| VcpuRestoreError::Ioctl {
            index,
            ioctl,
            source,
        }
    };
    // The shell set the host CPUID at creation; only a different saved CPUID
    // needs the (slow) KVM_SET_CPUID2.
    let shell_cpuid = vcpu_cpuid(host, index, 0);
    if !same_cpuid(&shell_cpuid, &state.cpuid) {
        let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| VcpuRestoreError::Ioctl {
            index,
            ioctl: "KVM_SET_CPUID2",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        fd.set_cpuid2(&cpuid).map_err(fail("KVM_SET_CPUID2"))?;
    }
    fd.set_mp_state(state.mp_state)
        .map_err(fail("KVM_SET_MP_STATE"))?;
    fd.set_regs(&state.regs).map_err(fail("KVM_SET_REGS"))?;
    fd.set_sregs(&state.sregs).map_err(fail("KVM_SET_SREGS"))?;
    fd.set_fpu(&kvm_fpu::from(&state.fpu))
        .map_err(fail("KVM_SET_FPU"))?;
    restore_xsave(host, fd, index, &state.xsave)?;
    fd.set_xcrs(&state.xcrs).map_err(fail("KVM_SET_XCRS"))?;
    fd.set_debug_regs(&state.debug_regs)
        .map_err(fail("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&state.lapic).map_err(fail("KVM_SET_LAPIC"))?;
    let refused = restore_msrs(fd, index, &state.msrs)?;
    fd.set_vcpu_events(&state.events)
        .map_err(fail("KVM_SET_VCPU_EVENTS"))?;
    Ok(refused)
}

/// CPUID tables equal up to the topology count the shell did not know.
fn same_cpuid(shell: &[kvm_cpuid_entry2], saved: &[kvm_cpuid_entry2]) -> bool {
    shell.len() == saved.len()
        && shell.iter().zip(saved).all(|(a, b)| {
            let mask = if a.function == 1 {
                0xff00_ffff
            } else {
                u32::MAX
            };
            a.function == b.function
                && a.index == b.index
                && a.flags == b.flags
                && a.eax == b.eax
                && (a.ebx & mask) == (b.ebx & mask)
                && a.ecx == b.ecx
                && a.edx == b.edx
        })
}
