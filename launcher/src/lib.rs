//! podvm's launcher as a library: the KubeVirt VMI mapping, shared by the `podvm` binary
//! (src/main.rs) and the fuzz targets (launcher/fuzz).

pub mod vmi;
