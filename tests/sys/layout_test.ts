/**
 * Checks every struct layout in sys/layout.ts against the system headers: a C
 * program built with gcc prints sizeof/offsetof for the same structs and fields.
 * The kernel-internal aio_ring is checked at run time (magic, header length).
 */
import assert from "node:assert/strict";
import * as layout from "../../sys/layout.ts";
import { AIO_RING_MAGIC, AioRing, ioDestroy, ioSetup } from "../../sys/mod.ts";

type Layout = Record<string, number>;

/** C type of each layout, and C expressions for fields that are not plain members. */
const C_TYPES: Record<string, { type: string; special?: Record<string, string> }> = {
  IOVEC: { type: "struct iovec" },
  EPOLL_EVENT: { type: "struct epoll_event" },
  TIMESPEC: { type: "struct timespec" },
  IOCB: { type: "struct iocb" },
  IO_EVENT: { type: "struct io_event" },
  // user_addr (Linux 6.5) was resv2 in older headers: same offset.
  IO_SQRING_OFFSETS: {
    type: "struct io_sqring_offsets",
    special: { user_addr: "(long)offsetof(struct io_sqring_offsets, USER_ADDR)" },
  },
  IO_CQRING_OFFSETS: {
    type: "struct io_cqring_offsets",
    special: { user_addr: "(long)offsetof(struct io_cqring_offsets, USER_ADDR)" },
  },
  IO_URING_PARAMS: { type: "struct io_uring_params" },
  IO_URING_SQE: { type: "struct io_uring_sqe" },
  IO_URING_CQE: { type: "struct io_uring_cqe" },
  MSGHDR: { type: "struct msghdr" },
  CMSGHDR: {
    type: "struct cmsghdr",
    special: { data: "(long)((char *)CMSG_DATA(&cm) - (char *)&cm)" },
  },
  SOCKADDR_UN: {
    type: "struct sockaddr_un",
    special: { pathMax: "(long)sizeof(((struct sockaddr_un *)0)->sun_path)" },
  },
  SOCKADDR_IN: { type: "struct sockaddr_in" },
  SOCKADDR_IN6: { type: "struct sockaddr_in6" },
  ADDRINFO: { type: "struct addrinfo" },
  STAT: { type: "struct stat" },
  STATX: { type: "struct statx" },
  STATFS: { type: "struct statfs" },
  KVM_USERSPACE_MEMORY_REGION: { type: "struct kvm_userspace_memory_region" },
  KVM_IRQ_LEVEL: { type: "struct kvm_irq_level" },
  KVM_IRQFD_STRUCT: { type: "struct kvm_irqfd" },
  KVM_IOEVENTFD_STRUCT: { type: "struct kvm_ioeventfd" },
  KVM_REGS_STRUCT: { type: "struct kvm_regs" },
  KVM_SEGMENT: { type: "struct kvm_segment" },
  KVM_DTABLE: { type: "struct kvm_dtable" },
  KVM_SREGS_STRUCT: { type: "struct kvm_sregs" },
  KVM_RUN_STRUCT: {
    type: "struct kvm_run",
    special: Object.fromEntries(
      [
        "io.direction",
        "io.size",
        "io.port",
        "io.count",
        "io.data_offset",
        "mmio.phys_addr",
        "mmio.data",
        "mmio.len",
        "mmio.is_write",
        "internal.suberror",
        "internal.ndata",
        "internal.data",
        "fail_entry.hardware_entry_failure_reason",
        "fail_entry.cpu",
      ].map((f) => [f.replace(".", "_"), `(long)offsetof(struct kvm_run, ${f})`]),
    ),
  },
};

/** Layouts that are not in any uapi header: checked at run time below. */
const RUNTIME_ONLY = new Set(["AIO_RING"]);

const HEADERS = [
  "stddef.h",
  "stdio.h",
  "time.h",
  "sys/uio.h",
  "sys/epoll.h",
  "sys/socket.h",
  "sys/un.h",
  "netinet/in.h",
  "netdb.h",
  "sys/stat.h",
  "sys/vfs.h",
  "linux/aio_abi.h",
  "linux/io_uring.h",
  "linux/kvm.h",
];

function layouts(): [string, Layout][] {
  return Object.entries(layout).filter(([, v]) => typeof v === "object") as [string, Layout][];
}

function cProgram(): string {
  const lines = ["#define _GNU_SOURCE", ...HEADERS.map((h) => `#include <${h}>`)];
  lines.push("#ifdef IORING_SETUP_NO_MMAP", "#define USER_ADDR user_addr", "#else");
  lines.push("#define USER_ADDR resv2", "#endif");
  lines.push("int main(void) {", "  struct cmsghdr cm;", "  (void)cm;");
  for (const [name, l] of layouts()) {
    if (RUNTIME_ONLY.has(name)) continue;
    const c = C_TYPES[name];
    if (!c) continue; // reported by the test below
    lines.push(`  printf("${name} size %ld\\n", (long)sizeof(${c.type}));`);
    for (const field of Object.keys(l)) {
      if (field === "size") continue;
      const expr = c.special?.[field] ?? `(long)offsetof(${c.type}, ${field})`;
      lines.push(`  printf("${name} ${field} %ld\\n", ${expr});`);
    }
  }
  lines.push("  return 0;", "}");
  return lines.join("\n");
}

Deno.test("every layout has a C counterpart or a runtime check", () => {
  for (const [name] of layouts()) {
    assert.ok(C_TYPES[name] || RUNTIME_ONLY.has(name), `no C check for ${name}`);
  }
});

Deno.test("layouts match the C headers (gcc sizeof/offsetof)", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await Deno.writeTextFile(`${dir}/layout.c`, cProgram());
    const cc = await new Deno.Command("gcc", {
      args: ["-O0", "-o", `${dir}/layout`, `${dir}/layout.c`],
    }).output();
    assert.equal(cc.code, 0, new TextDecoder().decode(cc.stderr));
    const run = await new Deno.Command(`${dir}/layout`).output();
    assert.equal(run.code, 0);
    const got = new Map<string, number>();
    for (const line of new TextDecoder().decode(run.stdout).trim().split("\n")) {
      const [name, field, value] = line.split(" ");
      got.set(`${name}.${field}`, Number(value));
    }
    let checked = 0;
    for (const [name, l] of layouts()) {
      if (RUNTIME_ONLY.has(name)) continue;
      for (const [field, value] of Object.entries(l)) {
        assert.equal(value, got.get(`${name}.${field}`), `${name}.${field}`);
        checked++;
      }
    }
    assert.ok(checked > 100, `only ${checked} values checked`);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("AIO_RING: header length and magic of a live io context", () => {
  const ctx = ioSetup(4);
  try {
    const view = new Uint32Array(
      Deno.UnsafePointerView.getArrayBuffer(Deno.UnsafePointer.create(ctx)!, layout.AIO_RING.size),
    );
    assert.equal(view[layout.AIO_RING.magic / 4], AIO_RING_MAGIC);
    assert.equal(view[layout.AIO_RING.header_length / 4], layout.AIO_RING.size);
    assert.equal(view[layout.AIO_RING.incompat_features / 4], 0);
    assert.ok(view[layout.AIO_RING.nr / 4] >= 4);
    assert.equal(view[layout.AIO_RING.head / 4], view[layout.AIO_RING.tail / 4]);
    const ring = AioRing.open(ctx);
    assert.ok(ring);
    assert.equal(ring.nr, view[layout.AIO_RING.nr / 4]);
  } finally {
    ioDestroy(ctx);
  }
});
