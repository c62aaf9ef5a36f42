/**
 * qcow2 on-disk constants, named as in QEMU's block/qcow2.h; sections refer
 * to QEMU's docs/interop/qcow2.txt.
 *
 * @module
 */

/** "QFI\xfb" as a big-endian u32 (qcow2.txt "Header", bytes 0-3). */
export const QCOW_MAGIC = 0x514649fb;

/** Smallest cluster_bits the format allows (512-byte clusters). */
export const MIN_CLUSTER_BITS = 9;
/** QEMU's implementation limit (2 MiB clusters); larger images are refused. */
export const MAX_CLUSTER_BITS = 21;
/** Extended L2 entries need clusters of at least 16 KiB (qcow2.txt "Header"). */
export const MIN_EXTENDED_L2_CLUSTER_BITS = 14;

/** Header length of version 2 (fixed) and the least of version 3. */
export const QCOW2_V2_HEADER_LENGTH = 72;
/** Least header_length of a version 3 image (through header_length). */
export const QCOW2_V3_HEADER_LENGTH = 104;
/** Offset of the optional compression_type byte (version 3). */
export const QCOW2_COMPRESSION_TYPE_OFFSET = 104;

/** QEMU's QCOW_MAX_L1_SIZE: the active L1 table is at most 32 MiB. */
export const QCOW_MAX_L1_SIZE = 32 << 20;
/** QEMU's QCOW_MAX_REFTABLE_SIZE: the refcount table is at most 8 MiB. */
export const QCOW_MAX_REFTABLE_SIZE = 8 << 20;
/** QEMU's QCOW_MAX_SNAPSHOTS. */
export const QCOW_MAX_SNAPSHOTS = 65536;
/** Longest backing file name (qcow2.txt "Header", backing_file_size). */
export const QCOW2_MAX_BACKING_FILE_NAME = 1023;
/** Longest backing format name QEMU accepts (sizeof bs->backing_format - 1). */
export const QCOW2_MAX_BACKING_FORMAT = 15;
/** Largest refcount_order (64-bit refcounts). */
export const QCOW2_MAX_REFCOUNT_ORDER = 6;

/** incompatible_features bit 0: refcounts may be inconsistent (lazy refcounts). */
export const QCOW2_INCOMPAT_DIRTY = 1 << 0;
/** incompatible_features bit 1: metadata may be corrupt; never write. */
export const QCOW2_INCOMPAT_CORRUPT = 1 << 1;
/** incompatible_features bit 2: guest data lives in an external data file. */
export const QCOW2_INCOMPAT_DATA_FILE = 1 << 2;
/** incompatible_features bit 3: compression_type is not zlib. */
export const QCOW2_INCOMPAT_COMPRESSION = 1 << 3;
/** incompatible_features bit 4: 128-bit L2 entries with 32 subclusters. */
export const QCOW2_INCOMPAT_EXTL2 = 1 << 4;
/** Every incompatible bit this driver knows. */
export const QCOW2_INCOMPAT_KNOWN = QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT |
  QCOW2_INCOMPAT_DATA_FILE | QCOW2_INCOMPAT_COMPRESSION | QCOW2_INCOMPAT_EXTL2;

/** compatible_features bit 0: lazy refcounts. */
export const QCOW2_COMPAT_LAZY_REFCOUNTS = 1 << 0;

/** compression_type 0: zlib (raw deflate, 4 KiB window). */
export const QCOW2_COMPRESSION_TYPE_ZLIB = 0;
/** compression_type 1: zstd. */
export const QCOW2_COMPRESSION_TYPE_ZSTD = 1;

/** crypt_method 0: no encryption. */
export const QCOW_CRYPT_NONE = 0;

/** Header extension types (qcow2.txt "Header extensions"). */
export const QCOW2_EXT_MAGIC_END = 0;
/** Backing file format name string. */
export const QCOW2_EXT_MAGIC_BACKING_FORMAT = 0xe2792aca;
/** Feature name table. */
export const QCOW2_EXT_MAGIC_FEATURE_TABLE = 0x6803f857;
/** External data file name string. */
export const QCOW2_EXT_MAGIC_DATA_FILE = 0x44415441;

/** Subclusters per cluster with extended L2 entries. */
export const QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER = 32;
/** Compressed data is counted in 512-byte sectors. */
export const QCOW2_COMPRESSED_SECTOR_SIZE = 512;

/** Deepest backing chain opened (a loop or a hostile chain stops here). */
export const QCOW2_MAX_BACKING_DEPTH = 32;
