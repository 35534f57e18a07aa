//! The guest's serial console of a VM process, copied into `serial.log` as
//! it grows (and once more when the VM stops).

use std::io::Write;
use std::time::Duration;

use super::Vm;
use crate::vm_protocol::VmPhase;

impl Vm {
    pub(super) fn serial_written(&self) -> usize {
        std::fs::metadata(&self.paths.serial).map_or(0, |m| m.len() as usize)
    }

    pub(super) fn append_serial_output(&self, written: &mut usize) {
        let Some(machine) = self.lock().machine.clone() else {
            return;
        };
        let output = machine.serial_output();
        if output.len() <= *written {
            return;
        }
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.paths.serial)
            .and_then(|mut f| f.write_all(&output[*written..]));
        if appended.is_ok() {
            *written = output.len();
        }
    }

    /// Copies the guest's serial output into `serial.log` as it grows.
    pub(super) fn copy_serial_output(&self) {
        let mut written = 0;
        loop {
            std::thread::sleep(Duration::from_millis(250));
            if self.lock().phase == VmPhase::Stopping {
                return;
            }
            self.append_serial_output(&mut written);
        }
    }
}
