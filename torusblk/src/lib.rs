//! The client side of Torus.
//!
//! - [`flex`]: the FlexVolume protocol (calls, options, replies), pure.
//! - [`driver`]: FlexVolume `mount`/`unmount` with a recorded attach process.
//! - [`attach`]: attaching a volume to a block device and keeping it attached.
//! - [`cgroup`]: moving the attach process out of kubelet's cgroup.
//! - [`kernel`]: the kernel NBD ioctl interface and `/dev/nbdN` discovery.
//! - [`fs`]: filesystem detection (never reformat), mkfs, mount, unmount.
//! - [`client`]: a client-only node (no pool, not in the ring) and an NBD server on it.
//! - [`entrypoint`]: the container's environment → `torusd` flags.

pub mod attach;
pub mod cgroup;
pub mod client;
pub mod driver;
pub mod entrypoint;
pub mod flex;
pub mod fs;
pub mod kernel;
