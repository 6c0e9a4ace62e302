//! The kernel's FUSE messages this export reads and writes itself (over
//! io_uring, and FORGET and INTERRUPT on /dev/fuse once the queues run;
//! the rest of /dev/fuse goes through `fuser`), as in
//! include/uapi/linux/fuse.h: `#[repr(C)]` structs read from and written
//! to the request buffers with zerocopy, in the host's byte order, instead
//! of hand-counted offsets.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

pub const FUSE_LOOKUP: u32 = 1;
pub const FUSE_FORGET: u32 = 2;
pub const FUSE_GETATTR: u32 = 3;
pub const FUSE_SETATTR: u32 = 4;
pub const FUSE_OPEN: u32 = 14;
pub const FUSE_READ: u32 = 15;
pub const FUSE_WRITE: u32 = 16;
pub const FUSE_STATFS: u32 = 17;
pub const FUSE_RELEASE: u32 = 18;
pub const FUSE_FSYNC: u32 = 20;
pub const FUSE_GETXATTR: u32 = 22;
pub const FUSE_LISTXATTR: u32 = 23;
pub const FUSE_FLUSH: u32 = 25;
pub const FUSE_INTERRUPT: u32 = 36;
pub const FUSE_DESTROY: u32 = 38;
pub const FUSE_BATCH_FORGET: u32 = 42;
pub const FUSE_FALLOCATE: u32 = 43;
pub const FUSE_LSEEK: u32 = 46;

/// `fuse_uring_cmd` commands.
pub const FUSE_IO_URING_CMD_REGISTER: u32 = 1;
pub const FUSE_IO_URING_CMD_COMMIT_AND_FETCH: u32 = 2;

pub const FATTR_SIZE: u32 = 1 << 3;
pub const FOPEN_DIRECT_IO: u32 = 1 << 0;
pub const FOPEN_PARALLEL_DIRECT_WRITES: u32 = 1 << 6;
pub const S_IFREG: u32 = 0o100_000;

macro_rules! abi {
    ($($(#[$doc:meta])* pub struct $name:ident { $($(#[$fdoc:meta])* pub $field:ident: $ty:ty,)* })*) => {
        $(
            $(#[$doc])*
            #[repr(C)]
            #[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
            pub struct $name { $($(#[$fdoc])* pub $field: $ty,)* }
        )*
    };
}

abi! {
    /// struct fuse_in_header.
    pub struct InHeader {
        pub len: u32,
        pub opcode: u32,
        pub unique: u64,
        pub nodeid: u64,
        pub uid: u32,
        pub gid: u32,
        pub pid: u32,
        pub total_extlen: u16,
        pub padding: u16,
    }

    /// struct fuse_out_header.
    pub struct OutHeader {
        pub len: u32,
        pub error: i32,
        pub unique: u64,
    }

    /// struct fuse_read_in.
    pub struct ReadIn {
        pub fh: u64,
        pub offset: u64,
        pub size: u32,
        pub read_flags: u32,
        pub lock_owner: u64,
        pub flags: u32,
        pub padding: u32,
    }

    /// struct fuse_write_in.
    pub struct WriteIn {
        pub fh: u64,
        pub offset: u64,
        pub size: u32,
        pub write_flags: u32,
        pub lock_owner: u64,
        pub flags: u32,
        pub padding: u32,
    }

    /// struct fuse_write_out.
    pub struct WriteOut {
        pub size: u32,
        pub padding: u32,
    }

    /// struct fuse_fallocate_in.
    pub struct FallocateIn {
        pub fh: u64,
        pub offset: u64,
        pub length: u64,
        pub mode: u32,
        pub padding: u32,
    }

    /// struct fuse_setattr_in.
    pub struct SetattrIn {
        pub valid: u32,
        pub padding: u32,
        pub fh: u64,
        pub size: u64,
        pub lock_owner: u64,
        pub atime: u64,
        pub mtime: u64,
        pub ctime: u64,
        pub atimensec: u32,
        pub mtimensec: u32,
        pub ctimensec: u32,
        pub mode: u32,
        pub unused4: u32,
        pub uid: u32,
        pub gid: u32,
        pub unused5: u32,
    }

    /// struct fuse_open_in.
    pub struct OpenIn {
        pub flags: u32,
        pub open_flags: u32,
    }

    /// struct fuse_open_out.
    pub struct OpenOut {
        pub fh: u64,
        pub open_flags: u32,
        pub backing_id: i32,
    }

    /// struct fuse_lseek_in.
    pub struct LseekIn {
        pub fh: u64,
        pub offset: u64,
        pub whence: u32,
        pub padding: u32,
    }

    /// struct fuse_lseek_out.
    pub struct LseekOut {
        pub offset: u64,
    }

    /// struct fuse_kstatfs (all of struct fuse_statfs_out).
    pub struct StatfsOut {
        pub blocks: u64,
        pub bfree: u64,
        pub bavail: u64,
        pub files: u64,
        pub ffree: u64,
        pub bsize: u32,
        pub namelen: u32,
        pub frsize: u32,
        pub padding: u32,
        pub spare: [u32; 6],
    }

    /// struct fuse_attr.
    pub struct Attr {
        pub ino: u64,
        pub size: u64,
        pub blocks: u64,
        pub atime: u64,
        pub mtime: u64,
        pub ctime: u64,
        pub atimensec: u32,
        pub mtimensec: u32,
        pub ctimensec: u32,
        pub mode: u32,
        pub nlink: u32,
        pub uid: u32,
        pub gid: u32,
        pub rdev: u32,
        pub blksize: u32,
        pub flags: u32,
    }

    /// struct fuse_attr_out.
    pub struct AttrOut {
        pub attr_valid: u64,
        pub attr_valid_nsec: u32,
        pub dummy: u32,
        pub attr: Attr,
    }

    /// struct fuse_getxattr_in (also LISTXATTR's).
    pub struct GetxattrIn {
        pub size: u32,
        pub padding: u32,
    }

    /// struct fuse_getxattr_out.
    pub struct GetxattrOut {
        pub size: u32,
        pub padding: u32,
    }

    /// struct fuse_uring_ent_in_out.
    pub struct UringEntInOut {
        pub flags: u64,
        /// Which request this is (given back with its answer).
        pub commit_id: u64,
        /// Bytes of payload: the request's, then the answer's.
        pub payload_sz: u32,
        pub padding: u32,
        pub reserved: u64,
    }

    /// struct fuse_uring_req_header: the header buffer of one queue
    /// entry.
    pub struct UringReqHeader {
        /// fuse_in_header, then fuse_out_header for the answer.
        pub in_out: [u8; 128],
        /// The opcode's own argument struct.
        pub op_in: [u8; 128],
        pub ring_ent_in_out: UringEntInOut,
    }

    /// struct fuse_uring_cmd_req, in the command area of a 128-byte SQE.
    pub struct UringCmdReq {
        pub flags: u64,
        pub commit_id: u64,
        pub qid: u16,
        pub padding: [u8; 6],
    }
}

// The sizes fuse.h gives (its FUSE_COMPAT sizes and the io_uring structs),
// checked when the crate is built.
const _: () = {
    assert!(size_of::<InHeader>() == 40);
    assert!(size_of::<OutHeader>() == 16);
    assert!(size_of::<ReadIn>() == 40);
    assert!(size_of::<WriteIn>() == 40);
    assert!(size_of::<WriteOut>() == 8);
    assert!(size_of::<FallocateIn>() == 32);
    assert!(size_of::<SetattrIn>() == 88);
    assert!(size_of::<OpenOut>() == 16);
    assert!(size_of::<LseekIn>() == 24);
    assert!(size_of::<StatfsOut>() == 80);
    assert!(size_of::<Attr>() == 88);
    assert!(size_of::<AttrOut>() == 104);
    assert!(size_of::<UringEntInOut>() == 32);
    assert!(size_of::<UringReqHeader>() == 288);
    assert!(size_of::<UringCmdReq>() == 24);
    assert!(size_of::<OpenIn>() == 8);
    assert!(size_of::<LseekOut>() == 8);
    assert!(size_of::<GetxattrIn>() == 8);
    assert!(size_of::<GetxattrOut>() == 8);
    assert!(std::mem::offset_of!(UringReqHeader, ring_ent_in_out) == 256);
};

/// Read `T` from the start of `bytes` (zeros where `bytes` is short, which
/// the kernel never sends: argument areas are 128 bytes).
pub fn read<T: FromBytes + IntoBytes>(bytes: &[u8]) -> T {
    let mut value = T::new_zeroed();
    let dst = value.as_mut_bytes();
    let n = dst.len().min(bytes.len());
    dst[..n].copy_from_slice(&bytes[..n]);
    value
}

/// Write `value` at the start of `out`; returns its size.
pub fn write<T: IntoBytes + Immutable>(out: &mut [u8], value: &T) -> usize {
    let bytes = value.as_bytes();
    out[..bytes.len()].copy_from_slice(bytes);
    bytes.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_sit_where_the_kernel_puts_them() {
        use zerocopy::FromZeros;
        let mut raw = [0u8; 40];
        raw[8..16].copy_from_slice(&0x1234_5678u64.to_ne_bytes());
        raw[16..20].copy_from_slice(&4096u32.to_ne_bytes());
        let r: ReadIn = read(&raw);
        assert_eq!((r.offset, r.size), (0x1234_5678, 4096));
        let mut out = [0u8; 104];
        let attr = AttrOut {
            attr: Attr {
                mode: S_IFREG | 0o600,
                blksize: 4096,
                ..Attr::new_zeroed()
            },
            ..AttrOut::new_zeroed()
        };
        assert_eq!(write(&mut out, &attr), 104);
        assert_eq!(&out[16 + 60..16 + 64], &(S_IFREG | 0o600).to_ne_bytes());
        assert_eq!(&out[16 + 80..16 + 84], &4096u32.to_ne_bytes());
    }
}
