/**
 * Checks sys/rbd.ts against Ceph's headers: gcc compiles a file that assigns
 * each librados/librbd function to a pointer of the C type our FFI symbol
 * table declares (an incompatible prototype is an error), and checks the
 * constants and the handle sizes with static assertions. Needs librbd-dev and
 * librados-dev (tools/setup.sh --test); without them it fails loudly.
 */
import assert from "node:assert/strict";
import {
  EVENT_TYPE_EVENTFD,
  librbdLoadError,
  RBD_WRITE_ZEROES_FLAG_THICK_PROVISION,
} from "../../sys/mod.ts";

/** The C prototype each FFI symbol stands for ("pointer"/"u64" handles are 8-byte pointers). */
const PROTOTYPES: Record<string, string> = {
  rados_create: "int (*)(rados_t *, const char *)",
  rados_conf_read_file: "int (*)(rados_t, const char *)",
  rados_conf_set: "int (*)(rados_t, const char *, const char *)",
  rados_connect: "int (*)(rados_t)",
  rados_shutdown: "void (*)(rados_t)",
  rados_ioctx_create: "int (*)(rados_t, const char *, rados_ioctx_t *)",
  rados_ioctx_set_namespace: "void (*)(rados_ioctx_t, const char *)",
  rados_ioctx_destroy: "void (*)(rados_ioctx_t)",
  rbd_open: "int (*)(rados_ioctx_t, const char *, rbd_image_t *, const char *)",
  rbd_open_read_only: "int (*)(rados_ioctx_t, const char *, rbd_image_t *, const char *)",
  rbd_close: "int (*)(rbd_image_t)",
  rbd_get_size: "int (*)(rbd_image_t, uint64_t *)",
  rbd_resize: "int (*)(rbd_image_t, uint64_t)",
  rbd_set_image_notification: "int (*)(rbd_image_t, int, int)",
  rbd_aio_create_completion: "int (*)(void *, rbd_callback_t, rbd_completion_t *)",
  rbd_aio_get_arg: "void *(*)(rbd_completion_t)",
  rbd_aio_get_return_value: "ssize_t (*)(rbd_completion_t)",
  rbd_aio_release: "void (*)(rbd_completion_t)",
  rbd_aio_readv: "int (*)(rbd_image_t, const struct iovec *, int, uint64_t, rbd_completion_t)",
  rbd_aio_writev: "int (*)(rbd_image_t, const struct iovec *, int, uint64_t, rbd_completion_t)",
  rbd_aio_discard: "int (*)(rbd_image_t, uint64_t, uint64_t, rbd_completion_t)",
  rbd_aio_write_zeroes: "int (*)(rbd_image_t, uint64_t, size_t, rbd_completion_t, int, int)",
  rbd_aio_flush: "int (*)(rbd_image_t, rbd_completion_t)",
  rbd_poll_io_events: "int (*)(rbd_image_t, rbd_completion_t *, int)",
};

Deno.test("librbd loads (librbd1 installed)", () => {
  assert.equal(librbdLoadError(), null);
});

Deno.test("sys/rbd.ts prototypes and constants match librbd.h and librados.h (gcc)", async () => {
  const lines = [
    "#include <stdint.h>",
    "#include <sys/types.h>",
    "#include <sys/uio.h>",
    "#include <rados/librados.h>",
    "#include <rbd/librbd.h>",
    `_Static_assert(EVENT_TYPE_EVENTFD == ${EVENT_TYPE_EVENTFD}, "EVENT_TYPE_EVENTFD");`,
    `_Static_assert(RBD_WRITE_ZEROES_FLAG_THICK_PROVISION == ${RBD_WRITE_ZEROES_FLAG_THICK_PROVISION}, "zero flag");`,
    `_Static_assert(sizeof(rbd_completion_t) == 8 && sizeof(rbd_image_t) == 8, "handles");`,
    `_Static_assert(sizeof(rados_t) == 8 && sizeof(rados_ioctx_t) == 8, "handles");`,
  ];
  for (const [name, type] of Object.entries(PROTOTYPES)) {
    const decl = type.replace("(*)", `(*p_${name})`);
    lines.push(`${decl} = ${name};`);
  }
  lines.push("int main(void) { return 0; }");
  const dir = await Deno.makeTempDir({ prefix: "rbd-layout-" });
  try {
    await Deno.writeTextFile(`${dir}/rbd.c`, lines.join("\n") + "\n");
    const cc = await new Deno.Command("gcc", {
      args: [
        "-Werror",
        "-Wall",
        "-Wno-unused-variable",
        "-c",
        "-o",
        `${dir}/rbd.o`,
        `${dir}/rbd.c`,
      ],
      stderr: "piped",
    }).output();
    assert(cc.success, new TextDecoder().decode(cc.stderr));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
