//! Linux guests on the real /dev/kvm: the 64-bit boot protocol (a probe
//! kernel that prints the command line it finds through the zero page),
//! and a real Linux kernel built by `make linux-guest` booting to its
//! console on COM1. Emulating hosts (kvm_pvm) run a kernel at about a
//! microsecond per instruction, so the real boot takes minutes there.

mod linux_common;

use std::time::{Duration, Instant};

use linux_common::*;
use vmstream_test_support::record_skip;
use vmstream_vmm::arch::x86_64::cpuid::CpuTemplate;
use vmstream_vmm::capture::capture;
use vmstream_vmm::linux::{LinuxBootError, LinuxBootSpec, VirtioDeviceSpec};
use vmstream_vmm::machine::{Machine, MachineConfig, VmShell};
use vmstream_vmm::restore::{CloneMemory, CloneSource, restore};

/// A minimal x86-64 ELF "kernel": one PT_LOAD of `code` at 16 MiB.
fn probe_elf(code: &[u8]) -> Vec<u8> {
    const PADDR: u64 = 0x100_0000;
    let mut elf = vec![0u8; 64 + 56];
    elf[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
    elf[16..18].copy_from_slice(&2u16.to_le_bytes());
    elf[18..20].copy_from_slice(&62u16.to_le_bytes());
    elf[20..24].copy_from_slice(&1u32.to_le_bytes());
    elf[24..32].copy_from_slice(&PADDR.to_le_bytes());
    elf[32..40].copy_from_slice(&64u64.to_le_bytes());
    elf[52..54].copy_from_slice(&64u16.to_le_bytes());
    elf[54..56].copy_from_slice(&56u16.to_le_bytes());
    elf[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = &mut elf[64..120];
    ph[..4].copy_from_slice(&1u32.to_le_bytes());
    ph[4..8].copy_from_slice(&5u32.to_le_bytes());
    ph[8..16].copy_from_slice(&120u64.to_le_bytes());
    ph[16..24].copy_from_slice(&PADDR.to_le_bytes());
    ph[24..32].copy_from_slice(&PADDR.to_le_bytes());
    ph[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    ph[40..48].copy_from_slice(&(code.len() as u64).to_le_bytes());
    elf.extend_from_slice(code);
    elf
}

/// Prints the NUL-terminated string at `boot_params.hdr.cmd_line_ptr`
/// (RSI + 0x228) on COM1, then `'0' + boot_params.e820_entries` (RSI +
/// 0x1e8), then the 4 bytes of the dword at 0xd000_0000 (the first virtio
/// window: "virt" when a device is there), then halts.
const PROBE_CODE: &[u8] = &[
    0x8b, 0x9e, 0x28, 0x02, 0x00, 0x00, // mov ebx, [rsi+0x228]
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0x8a, 0x03, // next: mov al, [rbx]
    0x84, 0xc0, // test al, al
    0x74, 0x06, // jz done
    0xee, // out dx, al
    0x48, 0xff, 0xc3, // inc rbx
    0xeb, 0xf4, // jmp next
    0x8a, 0x86, 0xe8, 0x01, 0x00, 0x00, // done: mov al, [rsi+0x1e8]
    0x04, 0x30, // add al, '0'
    0xee, // out dx, al
    0xbb, 0x00, 0x00, 0x00, 0xd0, // mov ebx, 0xd0000000
    0x8b, 0x03, // mov eax, [rbx]
    0xee, // out dx, al
    0xc1, 0xe8, 0x08, // shr eax, 8
    0xee, // out dx, al
    0xc1, 0xe8, 0x08, // shr eax, 8
    0xee, // out dx, al
    0xc1, 0xe8, 0x08, // shr eax, 8
    0xee, // out dx, al
    0xf4, // halt: hlt
    0xeb, 0xfd, // jmp halt
];

fn wait_for_serial(machine: &Machine, expected: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let serial = String::from_utf8_lossy(&machine.serial_output()).into_owned();
        if serial.contains(expected) || Instant::now() >= deadline {
            return serial;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn boot_protocol_hands_the_kernel_its_zero_page_and_command_line() {
    let test = "boot_protocol_hands_the_kernel_its_zero_page_and_command_line";
    let Some(host) = host(test) else { return };
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinux");
    std::fs::write(&kernel, probe_elf(PROBE_CODE)).unwrap();
    // (template, devices, what the dword at 0xd000_0000 reads as)
    let table = [
        (CpuTemplate::Host, vec![VirtioDeviceSpec::Rng], "virt"),
        (CpuTemplate::Emulated, vec![], "\0\0\0\0"),
    ];
    for (template, devices, window) in table {
        let spec = LinuxBootSpec {
            kernel: kernel.clone(),
            initrd: None,
            cmdline: "root=/dev/vda ro".into(),
            template,
            devices,
        };
        let expected = format!("{}4{window}", spec.full_cmdline());
        let machine = Machine::boot_linux(shell(&host, 64), &spec).expect("boot the probe");
        let serial = wait_for_serial(&machine, &expected, Duration::from_secs(20));
        assert_eq!(
            serial,
            expected,
            "{template:?}: vCPU {:?}",
            machine.vcpus()[0].status()
        );
        let unclaimed = u64::from(spec.devices.is_empty());
        assert_eq!(machine.stats().unclaimed_mmio_accesses, unclaimed);
        // Virtio devices are saved with the machine (window, GSI, state).
        machine.pause().expect("pause");
        let saved = machine.save_state().expect("save the machine");
        assert_eq!(saved.devices.virtio.len(), spec.devices.len());
    }
}

/// Sets MCR.OUT2 and IER.THRI on COM1 (the UART then raises IRQ 4 at
/// once: its transmitter is empty), then halts with interrupts off.
const SERIAL_IRQ_PROBE: &[u8] = &[
    0x66, 0xba, 0xfc, 0x03, // mov dx, 0x3fc (MCR)
    0xb0, 0x08, // mov al, OUT2
    0xee, // out dx, al
    0x66, 0xba, 0xf9, 0x03, // mov dx, 0x3f9 (IER)
    0xb0, 0x02, // mov al, THRI
    0xee, // out dx, al
    0xf4, // halt: hlt
    0xeb, 0xfd, // jmp halt
];

#[test]
fn uart_thr_empty_interrupt_reaches_the_pic_as_irq_4() {
    let test = "uart_thr_empty_interrupt_reaches_the_pic_as_irq_4";
    let Some(host) = host(test) else { return };
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinux");
    std::fs::write(&kernel, probe_elf(SERIAL_IRQ_PROBE)).unwrap();
    let mut spec = LinuxBootSpec::new(&kernel);
    spec.template = CpuTemplate::Host;
    let machine = Machine::boot_linux(shell(&host, 64), &spec).expect("boot the probe");
    let deadline = Instant::now() + Duration::from_secs(5);
    let irr = loop {
        machine.pause().expect("pause");
        let state = machine.save_state().expect("save state");
        // SAFETY: the master PIC's chip state is the `pic` member of the
        // union (chip_id KVM_IRQCHIP_PIC_MASTER).
        let irr = unsafe { state.vm.pic_master.chip.pic }.irr;
        if irr & (1 << 4) != 0 || Instant::now() > deadline {
            break irr;
        }
        machine.resume();
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_ne!(irr & (1 << 4), 0, "PIC IRR {irr:#04x}: IRQ 4 never rose");
}

#[test]
fn boot_refuses_what_it_cannot_boot_before_touching_the_vcpus() {
    let test = "boot_refuses_what_it_cannot_boot_before_touching_the_vcpus";
    let Some(host) = host(test) else { return };
    let missing = LinuxBootSpec::new("/nonexistent/vmlinux");
    let error = Machine::boot_linux(shell(&host, 64), &missing).unwrap_err();
    assert!(
        matches!(error, LinuxBootError::NotFound { what: "kernel", .. }),
        "{error}"
    );
    assert!(
        error.to_string().contains("/nonexistent/vmlinux"),
        "{error}"
    );
    let two = VmShell::create(
        &host,
        MachineConfig {
            vcpus: 2,
            memory_bytes: 64 << 20,
        },
    )
    .unwrap();
    assert!(matches!(
        Machine::boot_linux(two, &missing),
        Err(LinuxBootError::VcpuCount(2))
    ));
}

#[test]
fn linux_kernel_boots_to_its_console() {
    let test = "linux_kernel_boots_to_its_console";
    let Some(host) = host(test) else { return };
    let Some(kernel) = project_linux_dir(&["vmlinux"]).map(|dir| dir.join("vmlinux")) else {
        record_skip(
            test,
            "no project-built Linux kernel ($VMSTREAM_CACHE/linux-*/vmlinux): run make linux-guest",
        );
        return;
    };
    let mut spec = LinuxBootSpec::new(&kernel);
    // No root device: the kernel ends in the panic about mounting root.
    spec.cmdline = "panic=0".into();
    spec.devices = vec![VirtioDeviceSpec::Rng];
    eprintln!("booting {} with: {}", kernel.display(), spec.full_cmdline());
    let started = Instant::now();
    let machine = Machine::boot_linux(shell(&host, 128), &spec).expect("boot Linux");
    let seen = wait_for_milestones(
        &machine,
        &[
            &["Linux version"],
            &["Command line:"],
            &["Calibrating delay loop", "tsc: Detected", "clocksource:"],
            &[
                "Freeing unused kernel",
                "VFS: Unable to mount root",
                "Kernel panic",
                "Run /init",
            ],
        ],
        LINUX_BOOT_TIMEOUT,
    );
    let serial = String::from_utf8_lossy(&machine.serial_output()).into_owned();
    eprintln!("console in {}", keep_console(&serial).display());
    assert!(
        serial.contains("Clearing CPUID bits:"),
        "the kernel did not take clearcpuid="
    );
    let command_line = serial
        .lines()
        .find(|line| line.contains("Command line:"))
        .unwrap_or_default();
    assert!(
        command_line.contains("console=ttyS0") && command_line.contains("clearcpuid="),
        "{command_line}"
    );
    // The kernel found the virtio-rng window from the command line and its
    // driver brought the device up (Status register, offset 0x70).
    let mut status = [0u8; 4];
    machine.mmio().read(0xd000_0070, &mut status);
    assert_eq!(
        u32::from_le_bytes(status) & 0xf,
        0xf,
        "virtio-rng status {status:?}: ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK"
    );
    eprintln!(
        "{} milestones in {:?}; vCPU {:?}, {:?}",
        seen.len(),
        started.elapsed(),
        machine.vcpus()[0].status(),
        machine.stats().vcpus[0]
    );
}

/// A Linux guest captured mid-boot into a live image and cloned: the
/// clone (copy-on-write memory, the template's CPUID from the image) goes
/// on booting from where the capture left it, to the same root-mount panic.
#[test]
fn linux_captured_mid_boot_boots_on_in_a_clone() {
    let test = "linux_captured_mid_boot_boots_on_in_a_clone";
    let Some(host) = host(test) else { return };
    let Some(kernel) = project_linux_dir(&["vmlinux"]).map(|dir| dir.join("vmlinux")) else {
        record_skip(
            test,
            "no project-built Linux kernel ($VMSTREAM_CACHE/linux-*/vmlinux): run make linux-guest",
        );
        return;
    };
    let mut spec = LinuxBootSpec::new(&kernel);
    spec.cmdline = "panic=0".into();
    let source = Machine::boot_linux(shell(&host, 128), &spec).expect("boot Linux");
    wait_for_milestones(&source, &[&["Memory:"]], LINUX_BOOT_TIMEOUT);
    let dir = tempfile::tempdir().unwrap();
    let report = capture(&source, dir.path()).expect("capture the booting guest");
    let captured = String::from_utf8_lossy(&source.serial_output()).into_owned();
    source.stop();
    eprintln!(
        "captured after {} console bytes: {report:?}",
        captured.len()
    );
    let image = CloneSource::open(dir.path()).expect("open the image");
    let started = Instant::now();
    let clone =
        restore(shell(&host, 128), &image, &CloneMemory::CopyOnWrite).expect("restore the clone");
    let seen = wait_for_milestones(
        &clone.machine,
        &[&["Kernel panic - not syncing: VFS: Unable to mount root"]],
        LINUX_BOOT_TIMEOUT,
    );
    let output = String::from_utf8_lossy(&clone.machine.serial_output()).into_owned();
    assert!(
        !output.contains("Linux version"),
        "the clone booted from the start:\n{output}"
    );
    eprintln!(
        "clone started in {:?}, reached the panic {:?} later; its console begins {:?}",
        clone.timings.total,
        seen[0].1,
        output.lines().next().unwrap_or_default()
    );
    assert!(started.elapsed() < LINUX_BOOT_TIMEOUT);
}

/// On hardware KVM the kernel runs natively with the host's CPUID and
/// gets as far as starting init from the root disk (the project's disk has
/// no init yet: the patched kernel then idles). Emulating hosts cannot run
/// guest userspace at all.
#[test]
fn linux_reaches_init_on_hardware_kvm() {
    let test = "linux_reaches_init_on_hardware_kvm";
    if CpuTemplate::detect() == CpuTemplate::Emulated {
        record_skip(
            test,
            "this host's KVM emulates guest instructions (kvm_pvm or no vmx/svm): guest userspace cannot run",
        );
        return;
    }
    let Some(host) = host(test) else { return };
    let Some(dir) = project_linux_dir(&["vmlinux", "rootfs.ext2"]) else {
        record_skip(
            test,
            "no project-built Linux kernel and root disk ($VMSTREAM_CACHE/linux-*/{vmlinux,rootfs.ext2}): run make linux-guest",
        );
        return;
    };
    let mut spec = LinuxBootSpec::new(dir.join("vmlinux"));
    assert_eq!(spec.template, CpuTemplate::Host);
    spec.devices = vec![VirtioDeviceSpec::Block {
        image: dir.join("rootfs.ext2"),
        overlay: None,
    }];
    spec.cmdline = "root=/dev/vda ro rootwait".into();
    let machine = Machine::boot_linux(shell(&host, 128), &spec).expect("boot Linux");
    let seen = wait_for_milestones(
        &machine,
        &[
            &["Linux version"],
            &["VFS: Mounted root (ext2 filesystem) readonly"],
            &["Run /sbin/init", "Run /init", "Run /bin/sh"],
        ],
        Duration::from_secs(60),
    );
    eprintln!("init started after {:?}", seen.last().unwrap().1);
}
