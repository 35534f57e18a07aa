//! Micro guests boot in long mode on the real /dev/kvm, print through the
//! UART and talk through the mailbox; pause/resume and state save work on a
//! running machine.

mod kvm_common;

use std::time::Duration;

use kvm_common::*;
use vmstream_vmm::devices::mailbox::{report, request};
use vmstream_vmm::guests::{GuestProgram, counter_hash, request_answer};
use vmstream_vmm::machine::BootOptions;
use vmstream_vmm::vstate::VmState;

#[test]
fn counter_guest_counts_in_register_and_memory() {
    let Some(host) = kvm_or_skip("counter_guest_counts_in_register_and_memory") else {
        return;
    };
    let options = BootOptions {
        params: vec![255],
        fill: None,
    };
    let machine = boot_ready(&host, config(2, 16), GuestProgram::Counter, &options);
    let mailbox = machine.mailbox();
    for vcpu in 0..2u8 {
        let progress = mailbox
            .wait_report(0, REPORT_TIMEOUT, |r| {
                r.kind == report::PROGRESS && r.vcpu == vcpu
            })
            .unwrap_or_else(|| panic!("no progress from vCPU {vcpu}: {:?}", status(&machine)));
        let [register, memory, hash, index, ..] = progress.args;
        assert_eq!(index, u64::from(vcpu));
        assert_eq!(register % 256, 0);
        assert_eq!(
            memory, register,
            "memory counter follows the register counter"
        );
        assert_eq!(hash, counter_hash(register));
    }
    let serial = String::from_utf8_lossy(&machine.serial_output()).into_owned();
    assert_eq!(serial, "counter guest ready\n");
    let stats = machine.stats();
    assert!(stats.vcpus.iter().all(|v| v.exits > 0));
}

#[test]
fn request_guest_answers_and_pause_resume_keeps_it_serving() {
    let Some(host) = kvm_or_skip("request_guest_answers_and_pause_resume_keeps_it_serving") else {
        return;
    };
    let machine = boot_ready(
        &host,
        config(1, 16),
        GuestProgram::Request,
        &BootOptions::default(),
    );
    let mailbox = machine.mailbox();
    let first = mailbox
        .call(
            request::ANSWER,
            [7, 0, 0, 0, 0, 0, 0, 0],
            report::RESPONSE,
            REPORT_TIMEOUT,
        )
        .expect("first answer");
    assert_eq!(first.args[0], request_answer(7, 1));
    let paused_in = machine.pause().expect("pause");
    let state = machine.save_state().expect("save state while paused");
    eprintln!(
        "saved {} MSRs (host lists {}), XSAVE {} words, payload {} bytes",
        state.vcpus[0].msrs.len(),
        host.msr_indices().len(),
        state.vcpus[0].xsave.len(),
        state.encode().len()
    );
    let decoded = VmState::decode(&state.encode()).expect("payload decodes");
    assert_eq!(decoded.vcpus[0].regs, state.vcpus[0].regs);
    assert_eq!(decoded.devices, state.devices);
    assert_eq!(state.vcpus.len(), 1);
    assert!(
        state.vcpus[0].msrs.len() > 10,
        "MSRs saved: {}",
        state.vcpus[0].msrs.len()
    );
    machine.resume();
    let second = mailbox
        .call(
            request::ANSWER,
            [8, 0, 0, 0, 0, 0, 0, 0],
            report::RESPONSE,
            REPORT_TIMEOUT,
        )
        .expect("answer after resume");
    assert_eq!(second.args[0], request_answer(8, 2));
    assert!(paused_in < Duration::from_secs(5));
    assert!(
        machine.save_state().is_err(),
        "saving a running machine is refused"
    );
}
