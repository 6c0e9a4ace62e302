//! Control of a bound Linux loop device beyond what `losetup` offers:
//! `losetup` sets a device's offset and size limit only when it binds it,
//! but a partition's loop device must follow its partition when the disk
//! grows under a mounted filesystem. The kernel's `loop_info64` is a typed
//! `#[repr(C)]` struct; the ioctls are the stable ones of
//! `<linux/loop.h>`.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;
const LOOP_SET_CAPACITY: libc::c_ulong = 0x4C07;
const LO_NAME_SIZE: usize = 64;
const LO_KEY_SIZE: usize = 32;

/// `struct loop_info64` of `<linux/loop.h>`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LoopInfo64 {
    pub lo_device: u64,
    pub lo_inode: u64,
    pub lo_rdevice: u64,
    pub lo_offset: u64,
    /// Bytes; 0 means up to the end of the backing file.
    pub lo_sizelimit: u64,
    pub lo_number: u32,
    pub lo_encrypt_type: u32,
    pub lo_encrypt_key_size: u32,
    pub lo_flags: u32,
    pub lo_file_name: [u8; LO_NAME_SIZE],
    pub lo_crypt_name: [u8; LO_NAME_SIZE],
    pub lo_encrypt_key: [u8; LO_KEY_SIZE],
    pub lo_init: [u64; 2],
}

impl Default for LoopInfo64 {
    fn default() -> Self {
        Self {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: 0,
            lo_file_name: [0; LO_NAME_SIZE],
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; LO_KEY_SIZE],
            lo_init: [0; 2],
        }
    }
}

/// A bound loop device, opened for control.
pub struct LoopDevice {
    file: File,
    path: String,
}

fn err(path: &str, what: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{path}: {what}: {e}"))
}

impl LoopDevice {
    pub fn open(path: &Path) -> io::Result<Self> {
        let shown = path.display().to_string();
        // Opened for writing: the kernel asks that of LOOP_SET_STATUS64.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| err(&shown, "opening", e))?;
        Ok(Self { file, path: shown })
    }

    /// The device's status: backing file, offset, size limit, flags.
    pub fn status(&self) -> io::Result<LoopInfo64> {
        let mut info = LoopInfo64::default();
        // SAFETY: LOOP_GET_STATUS64 writes one loop_info64 into the
        // pointed-to struct, which is that type and lives across the call;
        // the descriptor is open.
        let r = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                LOOP_GET_STATUS64 as _,
                &mut info as *mut LoopInfo64,
            )
        };
        if r < 0 {
            return Err(err(
                &self.path,
                "LOOP_GET_STATUS64",
                io::Error::last_os_error(),
            ));
        }
        Ok(info)
    }

    /// Give the device a new size limit (bytes past its offset, 0 for up to
    /// the end of the backing file); the kernel resizes the device at once.
    /// Everything else is kept as it is.
    ///
    /// Some kernels answer EAGAIN while the device's page cache could not
    /// be dropped at once (util-linux retries too): tried for a second.
    pub fn set_size_limit(&self, limit: u64) -> io::Result<()> {
        let mut info = self.status()?;
        info.lo_sizelimit = limit;
        let mut tries = 0;
        loop {
            // SAFETY: LOOP_SET_STATUS64 reads one loop_info64 from the
            // pointer, a live struct of that type; the descriptor is open.
            let r = unsafe {
                libc::ioctl(
                    self.file.as_raw_fd(),
                    LOOP_SET_STATUS64 as _,
                    &info as *const LoopInfo64,
                )
            };
            if r >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EAGAIN) || tries == 50 {
                return Err(err(&self.path, "LOOP_SET_STATUS64", e));
            }
            tries += 1;
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Have the device take its backing file's current size (`losetup -c`).
    pub fn set_capacity(&self) -> io::Result<()> {
        // SAFETY: LOOP_SET_CAPACITY takes no argument; the descriptor is open.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), LOOP_SET_CAPACITY as _, 0) };
        if r < 0 {
            return Err(err(
                &self.path,
                "LOOP_SET_CAPACITY",
                io::Error::last_os_error(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loop_info64_has_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::offset_of!(LoopInfo64, lo_sizelimit), 32);
        assert_eq!(std::mem::offset_of!(LoopInfo64, lo_flags), 52);
        assert_eq!(std::mem::offset_of!(LoopInfo64, lo_file_name), 56);
        assert_eq!(std::mem::offset_of!(LoopInfo64, lo_init), 216);
    }
}
