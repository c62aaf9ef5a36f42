import assert from "node:assert/strict";
import { findKernel, resolveModules } from "./kernel_image.ts";

Deno.test("kernel modules: virtio-blk stack resolves dependencies first", () => {
  const mods = resolveModules(findKernel(), ["virtio_pci", "virtio_blk"]).map((m) => m.name);
  const at = (n: string) => {
    const i = mods.indexOf(n);
    assert.ok(i >= 0, `${n} missing from ${mods}`);
    return i;
  };
  assert.ok(at("virtio_ring") < at("virtio"));
  assert.ok(at("virtio") < at("virtio_pci"));
  assert.ok(at("virtio_pci_modern_dev") < at("virtio_pci"));
  assert.ok(at("virtio") < at("virtio_blk"));
  assert.equal(new Set(mods).size, mods.length, "no module twice");
});

Deno.test("kernel modules: an unknown module is an error", () => {
  assert.throws(() => resolveModules(findKernel(), ["no_such_module"]), /not found/);
});
