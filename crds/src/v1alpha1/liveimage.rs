//! LiveImage (`li`): a running VM captured into memory plus complete vCPU and
//! device state, from which VMClones start in milliseconds.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::shared::{
    Artifact, DNS1123_LABEL_PATTERN, DNS1123_SUBDOMAIN_PATTERN, LiveImagePhase, Placement,
    conditions_schema, string_enum,
};

/// What to capture and where to keep the image.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "vmstream.io",
    version = "v1alpha1",
    kind = "LiveImage",
    namespaced,
    status = "LiveImageStatus",
    derive = "PartialEq",
    shortname = "li",
    category = "vmstream",
    doc = "A running VM captured into a live image that VMClones start from.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Node", type_ = "string", json_path = ".status.node"),
    printcolumn(
        name = "Memory",
        type_ = "integer",
        json_path = ".status.memoryBytes",
        description = "guest memory in bytes"
    ),
    printcolumn(
        name = "Pause(ms)",
        type_ = "number",
        json_path = ".status.sourcePauseMs",
        description = "how long the source VM was paused for the capture"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct LiveImageSpec {
    /// Where the running VM comes from. Immutable.
    #[x_kube(validation = Rule::new("self == oldSelf").message("source is immutable"))]
    pub source: LiveImageSource,
    /// Node to capture on and keep the image at; any node when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
}

/// Exactly one of `boot` and `fromClone`.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.boot) != has(self.fromClone)").message("exactly one of source.boot or source.fromClone must be set"))]
pub struct LiveImageSource {
    /// Boot a test guest, wait until it signals ready, and capture it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<BootSource>,
    /// Capture a running VMClone of the same namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_clone: Option<CloneSource>,
}

string_enum! {
    /// Built-in micro guest to boot: `Counter` (counts and prints, proves a
    /// clone resumed at the right instruction), `Memory` (touches memory in
    /// patterns), `Request` (answers requests through the mailbox device).
    Guest { Counter, Memory, Request }
}

/// A guest booted from scratch: exactly one of a built-in micro `guest` and
/// a real `linux` guest.
#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.guest) != has(self.linux)").message("exactly one of boot.guest or boot.linux must be set"),
    validation = Rule::new("!has(self.fill) || has(self.guest)").message("fill applies only to built-in guests, not to boot.linux").field_path(".fill"),
)]
pub struct BootSource {
    /// A built-in micro guest (tests and benchmarks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<Guest>,
    /// A real Linux guest: kernel, initrd, disks and network from artifacts
    /// the node fetches and verifies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linux: Option<LinuxBoot>,
    /// Number of vCPUs, 1 to 8.
    #[serde(default = "default_vcpus")]
    #[schemars(range(min = 1, max = 8))]
    pub vcpus: u32,
    /// Guest memory in MiB, an even number from 2 to 65536.
    #[serde(rename = "memoryMiB")]
    #[schemars(range(min = 2, max = 65536))]
    #[x_kube(validation = Rule::new("self % 2 == 0").message("memoryMiB must be a multiple of 2"))]
    pub memory_mib: u32,
    /// Content the host writes into guest memory before the guest starts, so
    /// images are large and realistic without the guest writing them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fill: Option<MemoryFill>,
    /// When the booted guest counts as ready to capture.
    #[serde(default)]
    pub readiness: Readiness,
}

fn default_vcpus() -> u32 {
    1
}

/// Host-side pre-fill of guest memory: the given percentages of pages are
/// random, zero and duplicates of other pages; the rest stays as the guest
/// leaves it.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.randomPercent + self.zeroPercent + self.duplicatePercent <= 100").message("fill: randomPercent + zeroPercent + duplicatePercent must not exceed 100").field_path(".randomPercent"))]
pub struct MemoryFill {
    /// Seed of the random content, so fills are reproducible.
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    #[schemars(range(min = 0, max = 100))]
    pub random_percent: u32,
    #[serde(default)]
    #[schemars(range(min = 0, max = 100))]
    pub zero_percent: u32,
    #[serde(default)]
    #[schemars(range(min = 0, max = 100))]
    pub duplicate_percent: u32,
}

/// Most disks of a Linux guest.
pub const MAX_DISKS: usize = 16;
/// Most network interfaces of a Linux guest.
pub const MAX_NETWORK_INTERFACES: usize = 8;
/// Longest kernel command line, in bytes (x86's `COMMAND_LINE_SIZE`).
pub const MAX_CMDLINE_LEN: usize = 2048;

/// A Linux guest booted from a kernel (ELF `vmlinux` or `bzImage`), an
/// optional initrd and disk images, all fetched and verified by the node.
#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LinuxBoot {
    /// The kernel image.
    pub kernel: Artifact,
    /// An initial ramdisk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<Artifact>,
    /// The kernel command line (at most 2048 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_CMDLINE_LEN))]
    pub cmdline: Option<String>,
    /// Block devices, in order; names unique, at most one `root`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_DISKS))]
    #[x_kube(
        validation = Rule::new("self.all(d, self.exists_one(e, e.name == d.name))").message("disk names must be unique"),
        validation = Rule::new("self.filter(d, d.root).size() <= 1").message("at most one disk may be root"),
    )]
    pub disks: Vec<Disk>,
    /// Network interfaces, in order; names unique.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_NETWORK_INTERFACES))]
    #[x_kube(validation = Rule::new("self.all(n, self.exists_one(m, m.name == n.name))").message("network interface names must be unique"))]
    pub network: Vec<NetworkInterface>,
    /// How the daemon tells the booted guest is ready to capture (the
    /// timeout is `boot.readiness.timeoutSeconds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness: Option<LinuxReadiness>,
}

/// A block device of a Linux guest, backed by a disk image artifact.
#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Disk {
    /// Name of the disk, a DNS label (1 to 63 characters).
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS1123_LABEL_PATTERN))]
    pub name: String,
    /// The disk image.
    pub image: Artifact,
    /// The guest may not write the disk.
    #[serde(default)]
    pub read_only: bool,
    /// The disk holds the root file system.
    #[serde(default)]
    pub root: bool,
}

/// A network interface of a Linux guest.
#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkInterface {
    /// Name of the interface, a DNS label (1 to 63 characters).
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS1123_LABEL_PATTERN))]
    pub name: String,
    /// The guest's address with prefix length, e.g. `10.0.0.2/24`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("isCIDR(self)").message("ip must be an address with a prefix length, e.g. 10.0.0.2/24"))]
    pub ip: Option<String>,
    /// The default gateway's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("isIP(self)").message("gateway must be an IP address"))]
    pub gateway: Option<String>,
    /// The interface's MAC address, lowercase (`52:54:00:12:34:56`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 17))]
    #[x_kube(validation = Rule::new("self.matches('^([0-9a-f]{2}:){5}[0-9a-f]{2}$')").message("mac must be six lowercase hex pairs separated by colons"))]
    pub mac: Option<String>,
}

/// When a booted Linux guest counts as ready: exactly one of the probes.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.serialPattern), has(self.tcpProbe), has(self.icmp), has(self.agent)].filter(x, x).size() == 1").message("exactly one of readiness.serialPattern, tcpProbe, icmp or agent must be set"))]
pub struct LinuxReadiness {
    /// Text the guest prints on its serial console when ready (a
    /// substring match).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub serial_pattern: Option<String>,
    /// A TCP port of the guest that accepts connections when ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_probe: Option<TcpProbe>,
    /// The guest answers ICMP echo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp: Option<EmptyProbe>,
    /// The vmstream guest agent reports ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<EmptyProbe>,
}

/// A TCP readiness probe.
#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpProbe {
    /// Port, 1 to 65535.
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
}

/// A probe without parameters (`{}`).
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EmptyProbe {}

/// Readiness of a booting guest: it signals through the mailbox device.
#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Readiness {
    /// Give up (phase Failed) when the guest is not ready after this long.
    #[serde(default = "default_readiness_timeout")]
    #[schemars(range(min = 1, max = 600))]
    pub timeout_seconds: u32,
}

impl Default for Readiness {
    fn default() -> Self {
        Self {
            timeout_seconds: default_readiness_timeout(),
        }
    }
}

fn default_readiness_timeout() -> u32 {
    60
}

/// A running VMClone to capture.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CloneSource {
    /// Name of the VMClone, in the LiveImage's namespace.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS1123_SUBDOMAIN_PATTERN))]
    pub vm_clone: String,
}

/// Observed state of a LiveImage.
#[derive(JsonSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LiveImageStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<LiveImagePhase>,
    /// Node that holds the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Bytes the image occupies on the node (state file plus page store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// Guest memory size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// Pages stored (zero pages are elided).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub non_zero_pages: Option<u64>,
    /// Wall time of the whole capture, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture_time_ms: Option<f64>,
    /// How long the source VM was paused, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_pause_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl LiveImage {
    /// The phase in status, `Pending` when none was written yet.
    pub fn phase(&self) -> LiveImagePhase {
        self.status
            .as_ref()
            .and_then(|s| s.phase)
            .unwrap_or(LiveImagePhase::Pending)
    }
}
