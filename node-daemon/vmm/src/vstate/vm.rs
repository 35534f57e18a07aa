//! The host's KVM (`/dev/kvm`, supported CPUID, MSR list, XSAVE size), VM
//! creation with in-kernel irqchip and PIT2, guest RAM slot registration,
//! and the VM-wide state: PIC master/slave, IOAPIC, PIT and KVM clock.

use std::sync::Arc;

use kvm_bindings::{
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY, kvm_clock_data,
    kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use serde::{Deserialize, Serialize};

use crate::arch::x86_64::layout::ram_regions;
use crate::memory::{GuestRam, PAGE_SIZE};

/// Address of the TSS KVM needs for real-mode emulation on Intel hosts.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// The host's KVM and what it supports, queried once per process.
#[derive(Debug)]
pub struct KvmHost {
    kvm: Kvm,
    supported_cpuid: CpuId,
    msr_indices: Vec<u32>,
    xsave2_size: usize,
}

/// Error opening the host's KVM.
#[derive(Debug, thiserror::Error)]
pub enum KvmHostError {
    #[error("cannot open /dev/kvm")]
    Open(#[source] kvm_ioctls::Error),
    #[error("KVM API version {0} is not 12")]
    ApiVersion(i32),
    #[error("KVM lacks capability {0:?}")]
    MissingCapability(Cap),
    #[error("KVM_GET_SUPPORTED_CPUID failed")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    #[error("KVM_GET_MSR_INDEX_LIST failed")]
    MsrIndexList(#[source] kvm_ioctls::Error),
}

impl KvmHost {
    /// Opens `/dev/kvm` and checks the capabilities a micro-VM needs.
    pub fn open() -> Result<Arc<Self>, KvmHostError> {
        let kvm = Kvm::new().map_err(KvmHostError::Open)?;
        let api = kvm.get_api_version();
        if api != 12 {
            return Err(KvmHostError::ApiVersion(api));
        }
        for cap in [
            Cap::Irqchip,
            Cap::Pit2,
            Cap::UserMemory,
            Cap::ImmediateExit,
            Cap::Xsave,
            Cap::Xcrs,
            Cap::VcpuEvents,
            Cap::Debugregs,
            Cap::MpState,
            Cap::AdjustClock,
        ] {
            if !kvm.check_extension(cap) {
                return Err(KvmHostError::MissingCapability(cap));
            }
        }
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(KvmHostError::SupportedCpuid)?;
        let msr_indices = kvm
            .get_msr_index_list()
            .map_err(KvmHostError::MsrIndexList)?
            .as_slice()
            .to_vec();
        let xsave2_size = usize::try_from(kvm.check_extension_int(Cap::Xsave2)).unwrap_or(0);
        Ok(Arc::new(Self {
            kvm,
            supported_cpuid,
            msr_indices,
            xsave2_size,
        }))
    }

    /// Whether `/dev/kvm` can be opened read-write by this process.
    pub fn is_available() -> bool {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok()
    }

    /// The KVM system handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// CPUID entries KVM supports.
    pub fn supported_cpuid(&self) -> &CpuId {
        &self.supported_cpuid
    }

    /// MSRs KVM reports as saveable (KVM_GET_MSR_INDEX_LIST).
    pub fn msr_indices(&self) -> &[u32] {
        &self.msr_indices
    }

    /// Whether KVM offers `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` (dirty-log
    /// reads that leave pages writable until `KVM_CLEAR_DIRTY_LOG`).
    pub fn manual_dirty_log_protect(&self) -> bool {
        self.kvm
            .check_extension_raw(u64::from(kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2))
            > 0
    }

    /// Size of the XSAVE area KVM_GET_XSAVE2 needs, or 0 without XSAVE2.
    pub fn xsave2_size(&self) -> usize {
        self.xsave2_size
    }
}

/// Error creating a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmCreateError {
    #[error("KVM_CREATE_VM failed")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("KVM_CREATE_IRQCHIP failed")]
    Irqchip(#[source] kvm_ioctls::Error),
    #[error("KVM_CREATE_PIT2 failed")]
    Pit(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_USER_MEMORY_REGION of slot {slot} ({len} bytes at guest {gpa:#x}) failed")]
    MemorySlot {
        slot: u32,
        gpa: u64,
        len: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Creates a VM with in-kernel irqchip (PIC, IOAPIC, LAPICs) and PIT2.
pub fn create_vm(host: &KvmHost) -> Result<VmFd, VmCreateError> {
    let vm = host.kvm.create_vm().map_err(VmCreateError::CreateVm)?;
    // Only needed on Intel VMX for real mode; harmless to skip elsewhere.
    if let Err(error) = vm.set_tss_address(KVM_TSS_ADDRESS) {
        tracing::debug!(%error, "KVM_SET_TSS_ADDR refused (not needed for long-mode guests)");
    }
    vm.create_irq_chip().map_err(VmCreateError::Irqchip)?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(VmCreateError::Pit)?;
    Ok(vm)
}

/// Registers `ram` as guest memory: slot 0 below the MMIO hole, slot 1 above
/// 4 GiB for RAM beyond 3 GiB. This is the slow step (milliseconds per GiB
/// here); do it before a clone is requested.
pub fn register_ram(vm: &VmFd, ram: &GuestRam) -> Result<(), VmCreateError> {
    set_ram_slots(vm, ram, 0)
}

/// Switches KVM dirty logging of guest RAM on or off
/// (`KVM_MEM_LOG_DIRTY_PAGES` on every slot; the slots are registered
/// again with the same range and the new flags).
pub fn set_dirty_logging(vm: &VmFd, ram: &GuestRam, on: bool) -> Result<(), VmCreateError> {
    set_ram_slots(vm, ram, if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 })
}

/// Pages of guest RAM the guest wrote since logging was switched on or
/// since the last call (`KVM_GET_DIRTY_LOG` reads and clears each slot's
/// log), as a word bitmap over RAM page indices.
pub fn take_dirty_log(vm: &VmFd, ram: &GuestRam) -> Result<Vec<u64>, DirtyLogError> {
    let mut words = vec![0u64; ram.pages().div_ceil(64)];
    for (slot, region) in ram_regions(ram.len() as u64).into_iter().enumerate() {
        let log = vm
            .get_dirty_log(slot as u32, region.len as usize)
            .map_err(|source| DirtyLogError::GetLog {
                slot: slot as u32,
                source,
            })?;
        // Regions are multiples of 2 MiB: their first page is word-aligned.
        let first_word = (region.ram_offset as usize / PAGE_SIZE) / 64;
        for (i, word) in log.into_iter().enumerate() {
            if let Some(w) = words.get_mut(first_word + i) {
                *w |= word;
            }
        }
    }
    Ok(words)
}

/// Error reading the dirty log.
#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    #[error("KVM_GET_DIRTY_LOG of slot {slot} failed")]
    GetLog {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot switch dirty logging of guest RAM")]
    Slots(#[from] VmCreateError),
}

fn set_ram_slots(vm: &VmFd, ram: &GuestRam, flags: u32) -> Result<(), VmCreateError> {
    for (slot, region) in ram_regions(ram.len() as u64).into_iter().enumerate() {
        let slot = slot as u32;
        let mapping = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: region.gpa,
            memory_size: region.len,
            // The host range is one contiguous reservation.
            userspace_addr: ram.host_addr() as u64 + region.ram_offset,
        };
        // SAFETY: the host range lies inside `ram`, which the VM's owner keeps
        // mapped (possibly replaced in place with MAP_FIXED) until the VM fd
        // is closed.
        unsafe { vm.set_user_memory_region(mapping) }.map_err(|source| {
            VmCreateError::MemorySlot {
                slot,
                gpa: region.gpa,
                len: region.len,
                source,
            }
        })?;
    }
    Ok(())
}

/// VM-wide KVM state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmWideState {
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
}

/// Error saving or restoring VM-wide state.
#[derive(Debug, thiserror::Error)]
pub enum VmWideStateError {
    #[error("{0} failed")]
    Ioctl(&'static str, #[source] kvm_ioctls::Error),
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, VmWideStateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(|e| VmWideStateError::Ioctl("KVM_GET_IRQCHIP", e))?;
    Ok(chip)
}

/// Reads the VM-wide state (vCPUs paused).
pub fn save_vm_wide(vm: &VmFd) -> Result<VmWideState, VmWideStateError> {
    Ok(VmWideState {
        pit: vm
            .get_pit2()
            .map_err(|e| VmWideStateError::Ioctl("KVM_GET_PIT2", e))?,
        clock: vm
            .get_clock()
            .map_err(|e| VmWideStateError::Ioctl("KVM_GET_CLOCK", e))?,
        pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
    })
}

/// Writes the VM-wide state into a fresh VM (before its vCPUs run). The
/// kvmclock resumes at `clock` (the captured value, advanced by the caller
/// for the time since the capture: `vstate::clock`; flags cleared: KVM
/// only accepts them on output).
pub fn restore_vm_wide(vm: &VmFd, state: &VmWideState, clock: u64) -> Result<(), VmWideStateError> {
    vm.set_pit2(&state.pit)
        .map_err(|e| VmWideStateError::Ioctl("KVM_SET_PIT2", e))?;
    let clock = kvm_clock_data {
        clock,
        ..Default::default()
    };
    vm.set_clock(&clock)
        .map_err(|e| VmWideStateError::Ioctl("KVM_SET_CLOCK", e))?;
    for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
        vm.set_irqchip(chip)
            .map_err(|e| VmWideStateError::Ioctl("KVM_SET_IRQCHIP", e))?;
    }
    Ok(())
}
