//! The one identity of a Kubernetes object inside the daemon: [`ObjectKey`]
//! (kind, namespace, name), with the string forms it has on disk and on the
//! wire (`Kind/ns/name`, the VM id `vmc.ns.name`, the image id `ns/name`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The kind of an object the daemon acts on or a VM belongs to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum ObjectKind {
    /// A LiveImage (owner of an image's source VM).
    LiveImage,
    /// A VMClone (owner of a clone's VM).
    VMClone,
    VMMigration,
    /// Any other kind (e.g. given to `ctl launch --owner`); kept as written
    /// so records of such VMs are still read.
    Other(String),
}

impl ObjectKind {
    pub fn as_str(&self) -> &str {
        match self {
            Self::LiveImage => "LiveImage",
            Self::VMClone => "VMClone",
            Self::VMMigration => "VMMigration",
            Self::Other(kind) => kind,
        }
    }

    /// The prefix of the VM ids of objects of this kind.
    fn vm_id_prefix(&self) -> &'static str {
        match self {
            Self::LiveImage => "li",
            Self::VMClone => "vmc",
            Self::VMMigration | Self::Other(_) => "vm",
        }
    }
}

impl From<String> for ObjectKind {
    fn from(kind: String) -> Self {
        match kind.as_str() {
            "LiveImage" => Self::LiveImage,
            "VMClone" => Self::VMClone,
            "VMMigration" => Self::VMMigration,
            _ => Self::Other(kind),
        }
    }
}

impl From<ObjectKind> for String {
    fn from(kind: ObjectKind) -> Self {
        kind.as_str().to_owned()
    }
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A namespaced object: its kind, namespace and name. Serialized as the
/// owner in `vm.json` (`{"kind","namespace","name"}`); displayed and parsed
/// as `Kind/namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectKey {
    pub kind: ObjectKind,
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(kind: ObjectKind, namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            kind,
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    pub fn live_image(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self::new(ObjectKind::LiveImage, namespace, name)
    }

    pub fn vm_clone(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self::new(ObjectKind::VMClone, namespace, name)
    }

    pub fn vm_migration(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self::new(ObjectKind::VMMigration, namespace, name)
    }

    /// The key of a namespaced object (`None` without a namespace).
    pub fn of<K>(object: &K) -> Option<Self>
    where
        K: kube::Resource<DynamicType = ()>,
    {
        let meta = object.meta();
        Some(Self::new(
            K::kind(&()).into_owned().into(),
            meta.namespace.clone()?,
            meta.name.clone()?,
        ))
    }

    /// The id of the VM this object owns: `<kind prefix>.<namespace>.<name>`
    /// (`li.`, `vmc.`; namespaces hold no dots, so the id is unambiguous).
    /// VM directories are named by it: the format must not change.
    pub fn vm_id(&self) -> String {
        format!(
            "{}.{}.{}",
            self.kind.vm_id_prefix(),
            self.namespace,
            self.name
        )
    }

    /// `namespace/name`: a LiveImage's id on the page-streaming wire and in
    /// the VMNode's image list.
    pub fn namespaced_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The LiveImage `name` in this object's namespace.
    pub fn image_in_namespace(&self, name: &str) -> Self {
        Self::live_image(self.namespace.clone(), name)
    }

    /// The VMClone `name` in this object's namespace.
    pub fn clone_in_namespace(&self, name: &str) -> Self {
        Self::vm_clone(self.namespace.clone(), name)
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.kind, self.namespace, self.name)
    }
}

/// Why a `Kind/namespace/name` text is not a key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not Kind/namespace/name")]
pub struct ParseKeyError(pub String);

impl FromStr for ObjectKey {
    type Err = ParseKeyError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut parts = text.splitn(3, '/');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(kind), Some(namespace), Some(name))
                if !kind.is_empty() && !namespace.is_empty() && !name.is_empty() =>
            {
                Ok(Self::new(kind.to_owned().into(), namespace, name))
            }
            _ => Err(ParseKeyError(text.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_forms() {
        let key = ObjectKey::vm_clone("ns", "web.1");
        assert_eq!(key.to_string(), "VMClone/ns/web.1");
        assert_eq!(key.vm_id(), "vmc.ns.web.1");
        assert_eq!(key.namespaced_name(), "ns/web.1");
        assert_eq!("VMClone/ns/web.1".parse::<ObjectKey>(), Ok(key));
        assert_eq!(ObjectKey::live_image("ns", "img").vm_id(), "li.ns.img");
        let other: ObjectKey = "Thing/ns/x".parse().unwrap();
        assert_eq!(other.kind, ObjectKind::Other("Thing".into()));
        assert_eq!(other.vm_id(), "vm.ns.x");
        assert!("VMClone/ns".parse::<ObjectKey>().is_err());
        assert!("//n".parse::<ObjectKey>().is_err());
    }

    #[test]
    fn owners_in_records_of_older_daemons_are_read() {
        let json = r#"{"kind":"VMClone","namespace":"ns","name":"a"}"#;
        let key: ObjectKey = serde_json::from_str(json).unwrap();
        assert_eq!(key, ObjectKey::vm_clone("ns", "a"));
        assert_eq!(serde_json::to_string(&key).unwrap(), json);
        let other: ObjectKey =
            serde_json::from_str(r#"{"kind":"Thing","namespace":"ns","name":"a"}"#).unwrap();
        assert_eq!(other.kind.as_str(), "Thing");
    }
}
