//! The live-image format version (its own semver) and the rule deciding
//! which versions this build can read.

use std::fmt;

/// A format version: `major.minor.patch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FormatVersion {
    pub major: u16,
    pub minor: u16,
    pub patch: u16,
}

/// The version this build writes, and the newest it reads. 1.1 added
/// optional fields to the state payload (a Linux guest's virtio devices,
/// the capture's wall-clock time): 1.0 images still load, a 1.0 reader
/// refuses 1.1 images rather than drop the devices unnoticed.
pub const FORMAT_VERSION: FormatVersion = FormatVersion {
    major: 1,
    minor: 1,
    patch: 0,
};

impl FormatVersion {
    /// Whether a file written with `self` can be read by a reader that
    /// supports `supported`: same major, and a minor no newer than the
    /// reader's (a newer minor may carry fields the reader would ignore;
    /// we refuse rather than misread). The patch level never matters.
    pub fn is_readable_by(self, supported: FormatVersion) -> bool {
        self.major == supported.major && self.minor <= supported.minor
    }
}

impl fmt::Display for FormatVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(major: u16, minor: u16, patch: u16) -> FormatVersion {
        FormatVersion {
            major,
            minor,
            patch,
        }
    }

    #[test]
    fn same_major_older_or_equal_minor_is_readable() {
        let supported = v(1, 2, 0);
        assert!(v(1, 0, 0).is_readable_by(supported));
        assert!(v(1, 2, 0).is_readable_by(supported));
        assert!(v(1, 2, 9).is_readable_by(supported));
    }

    #[test]
    fn newer_minor_or_other_major_is_refused() {
        let supported = v(1, 2, 0);
        assert!(!v(1, 3, 0).is_readable_by(supported));
        assert!(!v(2, 0, 0).is_readable_by(supported));
        assert!(!v(0, 9, 0).is_readable_by(supported));
    }

    #[test]
    fn displays_as_semver() {
        assert_eq!(v(1, 2, 3).to_string(), "1.2.3");
    }
}
