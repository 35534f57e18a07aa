//! Telling a kernel image from other files by its magic: an ELF `vmlinux`
//! (`0x7f 'E' 'L' 'F'` at offset 0) or a bzImage (`HdrS` at 0x202, the
//! Linux x86 boot protocol's setup header signature).

/// Bytes of a file's start that decide [`kernel_format`].
pub const HEAD_LEN: usize = BZIMAGE_MAGIC_AT + BZIMAGE_MAGIC.len();

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const BZIMAGE_MAGIC: &[u8; 4] = b"HdrS";
const BZIMAGE_MAGIC_AT: usize = 0x202;

/// The kind of kernel image a file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

/// The kernel format of a file starting with `head`, or `None` when it is
/// no kernel image.
pub fn kernel_format(head: &[u8]) -> Option<KernelFormat> {
    if head.starts_with(ELF_MAGIC) {
        Some(KernelFormat::Elf)
    } else if head.get(BZIMAGE_MAGIC_AT..HEAD_LEN) == Some(BZIMAGE_MAGIC) {
        Some(KernelFormat::BzImage)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elf_and_bzimage_are_kernels() {
        assert_eq!(kernel_format(b"\x7fELF\x02\x01"), Some(KernelFormat::Elf));
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(kernel_format(&bz), Some(KernelFormat::BzImage));
        assert_eq!(kernel_format(b"#!/bin/sh\n"), None);
        assert_eq!(kernel_format(&bz[..0x204]), None);
        assert_eq!(kernel_format(&[]), None);
    }
}
