//! Puts a Linux guest into RAM: the uncompressed ELF kernel (`vmlinux`,
//! loaded by rust-vmm's `linux-loader` at its physical addresses), the
//! initrd at the top of low RAM, the command line and the zero page. The
//! ELF headers are checked here first, so a wrong file or a kernel that
//! does not fit is refused with what and where.

use std::io::Cursor;
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{KernelLoader, elf::Elf, load_cmdline};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::LinuxBootError;
use super::boot_params::{self, ZeroPageSpec};
use crate::arch::x86_64::layout::{
    CMDLINE_ADDR, CMDLINE_MAX, HIGH_MEMORY_START, MMIO_HOLE_START, ZERO_PAGE_ADDR,
};
use crate::machine::ram_access;
use crate::memory::{GuestRam, guest_memory_view};

const PT_LOAD: u32 = 1;
const EM_X86_64: u16 = 62;

/// Where a loaded kernel starts and what was placed around it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedKernel {
    /// The 64-bit entry point (physical).
    pub entry: u64,
    /// First byte after the kernel's loaded segments (including bss).
    pub kernel_end: u64,
    /// Guest address and size of the initrd.
    pub initrd: Option<(u64, u64)>,
}

/// What is wrong with a file that should be an x86-64 ELF kernel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ElfProblem {
    #[error("no ELF magic")]
    NotElf,
    #[error("a bzImage; pass the uncompressed vmlinux instead")]
    BzImage,
    #[error("not a 64-bit little-endian ELF")]
    Not64BitLittleEndian,
    #[error("built for ELF machine {0}, not x86-64 (62)")]
    NotX86_64(u16),
    #[error("its headers end past the end of the file")]
    Truncated,
    #[error("no loadable segment")]
    NoLoadableSegment,
}

/// The physical extent of an ELF kernel: entry point and the lowest and
/// highest (exclusive) addresses its loadable segments occupy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElfExtent {
    pub entry: u64,
    pub start: u64,
    pub end: u64,
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

/// Reads the ELF header and program headers of `image`.
pub fn elf_extent(image: &[u8]) -> Result<ElfExtent, ElfProblem> {
    if !image.starts_with(b"\x7fELF") {
        return Err(if image.get(0x202..0x206) == Some(b"HdrS") {
            ElfProblem::BzImage
        } else {
            ElfProblem::NotElf
        });
    }
    // EI_CLASS = ELFCLASS64, EI_DATA = ELFDATA2LSB.
    if image.get(4..6) != Some(&[2, 1]) {
        return Err(ElfProblem::Not64BitLittleEndian);
    }
    let machine = u16_at(image, 18).ok_or(ElfProblem::Truncated)?;
    if machine != EM_X86_64 {
        return Err(ElfProblem::NotX86_64(machine));
    }
    let entry = u64_at(image, 24).ok_or(ElfProblem::Truncated)?;
    let phoff = u64_at(image, 32).ok_or(ElfProblem::Truncated)? as usize;
    let phentsize = u16_at(image, 54).ok_or(ElfProblem::Truncated)? as usize;
    let phnum = u16_at(image, 56).ok_or(ElfProblem::Truncated)? as usize;
    let mut extent: Option<(u64, u64)> = None;
    for i in 0..phnum {
        let at = phoff
            .checked_add(i * phentsize)
            .ok_or(ElfProblem::Truncated)?;
        let kind = u32_at(image, at).ok_or(ElfProblem::Truncated)?;
        let paddr = u64_at(image, at + 24).ok_or(ElfProblem::Truncated)?;
        let memsz = u64_at(image, at + 40).ok_or(ElfProblem::Truncated)?;
        if kind != PT_LOAD || memsz == 0 {
            continue;
        }
        let end = paddr.checked_add(memsz).ok_or(ElfProblem::Truncated)?;
        extent = Some(extent.map_or((paddr, end), |(s, e)| (s.min(paddr), e.max(end))));
    }
    let (start, end) = extent.ok_or(ElfProblem::NoLoadableSegment)?;
    Ok(ElfExtent { entry, start, end })
}

fn read_file(path: &Path, what: &'static str) -> Result<Vec<u8>, LinuxBootError> {
    std::fs::read(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            LinuxBootError::NotFound {
                what,
                path: path.to_owned(),
            }
        } else {
            LinuxBootError::Read {
                what,
                path: path.to_owned(),
                source,
            }
        }
    })
}

/// Loads `kernel` (and `initrd`) into `ram` and writes the command line and
/// the zero page; the long-mode tables are the caller's.
pub fn load(
    ram: &GuestRam,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<LoadedKernel, LinuxBootError> {
    let ram_len = ram.len() as u64;
    let image = read_file(kernel, "kernel")?;
    let extent = elf_extent(&image).map_err(|problem| LinuxBootError::NotElf {
        path: kernel.to_owned(),
        problem,
    })?;
    let low_ram_end = ram_len.min(MMIO_HOLE_START);
    if extent.start < HIGH_MEMORY_START || extent.end > low_ram_end {
        return Err(LinuxBootError::KernelDoesNotFit {
            path: kernel.to_owned(),
            start: extent.start,
            end: extent.end,
            low_ram_end,
        });
    }
    let memory = guest_memory_view(&ram_access(ram)).map_err(|e| LinuxBootError::GuestWrite {
        what: "kernel",
        detail: e.to_string(),
    })?;
    let loaded = Elf::load(
        &memory,
        None,
        &mut Cursor::new(&image),
        Some(GuestAddress(HIGH_MEMORY_START)),
    )
    .map_err(|source| LinuxBootError::KernelLoad {
        path: kernel.to_owned(),
        source,
    })?;
    let initrd = initrd
        .map(|path| load_initrd(&memory, ram_len, extent.end, path))
        .transpose()?;
    let cmdline_len = write_cmdline(&memory, cmdline)?;
    let params = boot_params::zero_page(&ZeroPageSpec {
        ram_len,
        cmdline_addr: CMDLINE_ADDR,
        cmdline_len,
        initrd,
    });
    memory
        .write_obj(params, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(|e| LinuxBootError::GuestWrite {
            what: "zero page",
            detail: e.to_string(),
        })?;
    Ok(LoadedKernel {
        entry: loaded.kernel_load.0,
        kernel_end: extent.end,
        initrd,
    })
}

fn load_initrd(
    memory: &GuestMemoryMmap,
    ram_len: u64,
    kernel_end: u64,
    path: &Path,
) -> Result<(u64, u64), LinuxBootError> {
    let bytes = read_file(path, "initrd")?;
    let size = bytes.len() as u64;
    let addr = boot_params::initrd_address(ram_len, kernel_end, size).ok_or_else(|| {
        LinuxBootError::InitrdDoesNotFit {
            path: path.to_owned(),
            size,
            room: ram_len.min(MMIO_HOLE_START).saturating_sub(kernel_end),
        }
    })?;
    memory
        .write_slice(&bytes, GuestAddress(addr))
        .map_err(|e| LinuxBootError::GuestWrite {
            what: "initrd",
            detail: e.to_string(),
        })?;
    Ok((addr, size))
}

/// Writes `cmdline` (trimmed) NUL-terminated at [`CMDLINE_ADDR`]; returns
/// its length without the NUL.
fn write_cmdline(memory: &GuestMemoryMmap, cmdline: &str) -> Result<usize, LinuxBootError> {
    if cmdline.len() >= CMDLINE_MAX {
        return Err(LinuxBootError::CmdlineTooLong {
            len: cmdline.len(),
            max: CMDLINE_MAX - 1,
        });
    }
    let invalid = |e: linux_loader::cmdline::Error| LinuxBootError::CmdlineInvalid {
        reason: e.to_string(),
    };
    let mut line = Cmdline::new(CMDLINE_MAX).map_err(invalid)?;
    line.insert_str(cmdline).map_err(invalid)?;
    let len = line.as_cstring().map_err(invalid)?.as_bytes().len();
    load_cmdline(memory, GuestAddress(CMDLINE_ADDR), &line).map_err(|e| {
        LinuxBootError::GuestWrite {
            what: "command line",
            detail: e.to_string(),
        }
    })?;
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal x86-64 ELF: header, one PT_LOAD of `code` at `paddr`.
    pub(crate) fn tiny_elf(paddr: u64, code: &[u8], memsz: u64) -> Vec<u8> {
        let mut elf = vec![0u8; 64 + 56];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4..7].copy_from_slice(&[2, 1, 1]);
        elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        elf[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        elf[20..24].copy_from_slice(&1u32.to_le_bytes());
        elf[24..32].copy_from_slice(&paddr.to_le_bytes());
        elf[32..40].copy_from_slice(&64u64.to_le_bytes());
        elf[52..54].copy_from_slice(&64u16.to_le_bytes());
        elf[54..56].copy_from_slice(&56u16.to_le_bytes());
        elf[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = 64;
        elf[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        elf[ph + 4..ph + 8].copy_from_slice(&7u32.to_le_bytes());
        elf[ph + 8..ph + 16].copy_from_slice(&120u64.to_le_bytes());
        elf[ph + 16..ph + 24].copy_from_slice(&paddr.to_le_bytes());
        elf[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
        elf[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        elf[ph + 40..ph + 48].copy_from_slice(&memsz.to_le_bytes());
        elf.extend_from_slice(code);
        elf
    }

    #[test]
    fn reads_the_extent_of_a_kernel() {
        let elf = tiny_elf(0x100_0000, &[0xf4], 0x20_0000);
        assert_eq!(
            elf_extent(&elf),
            Ok(ElfExtent {
                entry: 0x100_0000,
                start: 0x100_0000,
                end: 0x120_0000
            })
        );
    }

    #[test]
    fn names_what_is_wrong_with_other_files() {
        let mut bzimage = vec![0u8; 0x300];
        bzimage[0x202..0x206].copy_from_slice(b"HdrS");
        let mut elf32 = tiny_elf(0x100_0000, &[0xf4], 1);
        elf32[4] = 1;
        let mut arm = tiny_elf(0x100_0000, &[0xf4], 1);
        arm[18..20].copy_from_slice(&183u16.to_le_bytes());
        let mut cut = tiny_elf(0x100_0000, &[0xf4], 1);
        cut.truncate(80);
        let mut empty = tiny_elf(0x100_0000, &[0xf4], 0);
        empty[64..68].copy_from_slice(&4u32.to_le_bytes());
        let table: [(&[u8], ElfProblem); 6] = [
            (b"#!/bin/sh\n", ElfProblem::NotElf),
            (&bzimage, ElfProblem::BzImage),
            (&elf32, ElfProblem::Not64BitLittleEndian),
            (&arm, ElfProblem::NotX86_64(183)),
            (&cut, ElfProblem::Truncated),
            (&empty, ElfProblem::NoLoadableSegment),
        ];
        for (image, problem) in table {
            assert_eq!(elf_extent(image), Err(problem.clone()), "{problem}");
        }
    }

    #[test]
    fn loads_kernel_cmdline_initrd_and_zero_page() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, tiny_elf(0x100_0000, &[0xf4, 0xeb, 0xfd], 0x1000)).unwrap();
        let initrd = dir.path().join("initrd");
        std::fs::write(&initrd, vec![0x5a; 10_000]).unwrap();
        let ram = GuestRam::reserve(32 << 20).unwrap();
        let loaded = load(&ram, &kernel, Some(&initrd), "console=ttyS0 quiet").unwrap();
        assert_eq!(loaded.entry, 0x100_0000);
        assert_eq!(loaded.initrd, Some(((32 << 20) - 12_288, 10_000)));
        let memory = guest_memory_view(&ram_access(&ram)).unwrap();
        let code: [u8; 3] = memory.read_obj(GuestAddress(0x100_0000)).unwrap();
        assert_eq!(code, [0xf4, 0xeb, 0xfd]);
        let mut line = [0u8; 20];
        memory
            .read_slice(&mut line, GuestAddress(CMDLINE_ADDR))
            .unwrap();
        assert_eq!(&line, b"console=ttyS0 quiet\0");
        let cmd_line_ptr: u32 = memory
            .read_obj(GuestAddress(ZERO_PAGE_ADDR + 0x228))
            .unwrap();
        assert_eq!(cmd_line_ptr as u64, CMDLINE_ADDR);
        let e820_entries: u8 = memory
            .read_obj(GuestAddress(ZERO_PAGE_ADDR + 0x1e8))
            .unwrap();
        assert_eq!(e820_entries, 4);
    }

    #[test]
    fn refuses_what_cannot_boot() {
        let dir = tempfile::tempdir().unwrap();
        let ram = GuestRam::reserve(32 << 20).unwrap();
        let missing = dir.path().join("no-such-vmlinux");
        assert!(matches!(
            load(&ram, &missing, None, ""),
            Err(LinuxBootError::NotFound { what: "kernel", .. })
        ));
        let big = dir.path().join("big");
        std::fs::write(&big, tiny_elf(0x100_0000, &[0xf4], 64 << 20)).unwrap();
        assert!(matches!(
            load(&ram, &big, None, ""),
            Err(LinuxBootError::KernelDoesNotFit { end, .. }) if end == 0x500_0000
        ));
        let low = dir.path().join("low");
        std::fs::write(&low, tiny_elf(0x8000, &[0xf4], 1)).unwrap();
        assert!(matches!(
            load(&ram, &low, None, ""),
            Err(LinuxBootError::KernelDoesNotFit { start: 0x8000, .. })
        ));
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, tiny_elf(0x100_0000, &[0xf4], 1)).unwrap();
        let long = "x".repeat(CMDLINE_MAX);
        assert!(matches!(
            load(&ram, &kernel, None, &long),
            Err(LinuxBootError::CmdlineTooLong { .. })
        ));
        assert!(matches!(
            load(&ram, &kernel, None, "console=ttyS0\tquiet"),
            Err(LinuxBootError::CmdlineInvalid { .. })
        ));
        let initrd = dir.path().join("initrd");
        std::fs::write(&initrd, vec![0u8; 31 << 20]).unwrap();
        assert!(matches!(
            load(&ram, &kernel, Some(&initrd), ""),
            Err(LinuxBootError::InitrdDoesNotFit { .. })
        ));
    }
}
