/**
 * vm/: the top layer, a minimal KVM host around the dataplane. A VM with RAM
 * from a memfd, the in-kernel 8259, one vCPU looping on KVM_RUN in a Worker,
 * an 8250 UART, test ports, and a virtio-blk device on the virtio-mmio
 * transport whose queues run in dataplane/'s IOThreads, with QueueNotify
 * wired in the kernel to the queue's kick eventfd (KVM_IOEVENTFD) and the
 * IOThread's call eventfd wired to the device's GSI (KVM_IRQFD).
 *
 * Not for: the virtio-blk dataplane, the block layer or the ring code (the
 * same ones serve vhost-user: dataplane/, block/, virtio/); booting a stock
 * kernel (no BIOS, no ACPI, no APIC timer: the guest is tests/vm/guest).
 *
 * @module
 */

export { checkKvmCapabilities, KvmVm, VM_LAYOUT, type VmOptions, type VmResult } from "./kvm_vm.ts";
export {
  VIRTIO_CONFIG_S_ACKNOWLEDGE,
  VIRTIO_CONFIG_S_DRIVER,
  VIRTIO_CONFIG_S_DRIVER_OK,
  VIRTIO_CONFIG_S_FAILED,
  VIRTIO_CONFIG_S_FEATURES_OK,
  VIRTIO_CONFIG_S_NEEDS_RESET,
  VIRTIO_MMIO,
  VIRTIO_MMIO_INT_CONFIG,
  VIRTIO_MMIO_INT_VRING,
  VIRTIO_MMIO_MAGIC,
  VIRTIO_MMIO_SIZE,
  VIRTIO_MMIO_VERSION,
  type VirtioMmioBackend,
  VirtioMmioDevice,
  type VirtioMmioDeviceOptions,
  type VirtioMmioQueue,
} from "./virtio_mmio.ts";
export { VIRTIO_ID_BLOCK, VirtioMmioBlk, type VirtioMmioBlkOptions } from "./virtio_mmio_blk.ts";
export { Serial8250, SERIAL_COM1 } from "./serial.ts";
export { TEST_F_NO_VERIFY, TEST_F_QUICK, TEST_PORT, TestDevice } from "./test_device.ts";
export { flatSegment, Vcpu, type VcpuEnd, type VcpuExit, type VcpuExitHandler } from "./vcpu.ts";
export { GuestRam } from "./guest_ram.ts";
export { buildGuest, DEFAULT_GUEST_DIR, GUEST_CFLAGS, GuestBuildError } from "./guest_image.ts";
export { parseVmArgs, VM_USAGE, type VmCliOptions } from "./vm_options.ts";
