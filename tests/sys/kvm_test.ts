/**
 * sys/kvm.ts: the ioctl numbers against <linux/kvm.h> (gcc), and a live
 * real-mode guest that exercises memory, registers, KVM_RUN exits and
 * KVM_IOEVENTFD (skipped, loudly, where /dev/kvm is missing).
 */
import assert from "node:assert/strict";
import {
  close,
  eventfd,
  eventfdRead,
  KVM_CAP_IOEVENTFD,
  KVM_CAP_IRQCHIP,
  KVM_CAP_IRQFD,
  KVM_CAP_SET_TSS_ADDR,
  KVM_CAP_USER_MEMORY,
  KVM_EXIT_HLT,
  KVM_EXIT_IO,
  KVM_EXIT_IO_OUT,
  KVM_IOCTL,
  KVM_RUN_STRUCT,
  kvmCheckExtension,
  kvmCreateVcpu,
  kvmCreateVm,
  kvmGetRegs,
  kvmGetSregs,
  kvmGetVcpuMmapSize,
  kvmIoeventfd,
  kvmIoeventfdDeassign,
  kvmMapRun,
  kvmRun,
  kvmSetRegs,
  kvmSetSregs,
  kvmSetTssAddr,
  kvmSetUserMemoryRegion,
  mmapAnonymous,
  openKvm,
  SysError,
} from "../../sys/mod.ts";

const HAVE_KVM = (() => {
  try {
    Deno.statSync("/dev/kvm");
    return true;
  } catch {
    console.warn("SKIP: /dev/kvm is missing: the live KVM tests do not run");
    return false;
  }
})();

Deno.test("KVM ioctl numbers and capabilities match <linux/kvm.h>", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const names = Object.keys(KVM_IOCTL);
    const caps = ["IRQCHIP", "USER_MEMORY", "SET_TSS_ADDR", "IRQFD", "IOEVENTFD"];
    const src = [
      "#include <stdio.h>",
      "#include <linux/kvm.h>",
      "int main(void) {",
      ...names.map((n) => `  printf("${n} %lu\\n", (unsigned long)KVM_${n});`),
      ...caps.map((c) => `  printf("CAP_${c} %lu\\n", (unsigned long)KVM_CAP_${c});`),
      "  return 0;",
      "}",
    ].join("\n");
    await Deno.writeTextFile(`${dir}/k.c`, src);
    const cc = await new Deno.Command("gcc", { args: ["-o", `${dir}/k`, `${dir}/k.c`] }).output();
    assert.equal(cc.code, 0, new TextDecoder().decode(cc.stderr));
    const out = new TextDecoder().decode((await new Deno.Command(`${dir}/k`).output()).stdout);
    const got = new Map(out.trim().split("\n").map((l) => l.split(" ") as [string, string]));
    for (const n of names) {
      assert.equal(KVM_IOCTL[n as keyof typeof KVM_IOCTL], Number(got.get(n)), n);
    }
    assert.equal(KVM_CAP_IRQCHIP, Number(got.get("CAP_IRQCHIP")));
    assert.equal(KVM_CAP_USER_MEMORY, Number(got.get("CAP_USER_MEMORY")));
    assert.equal(KVM_CAP_SET_TSS_ADDR, Number(got.get("CAP_SET_TSS_ADDR")));
    assert.equal(KVM_CAP_IRQFD, Number(got.get("CAP_IRQFD")));
    assert.equal(KVM_CAP_IOEVENTFD, Number(got.get("CAP_IOEVENTFD")));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("KVM ioctls on a bad fd throw SysError", () => {
  assert.throws(() => kvmCreateVm(-1), (e) => e instanceof SysError && e.code === "EBADF");
  assert.throws(() => kvmGetRegs(-1), (e) => e instanceof SysError && e.call.includes("GET_REGS"));
});

Deno.test({
  name: "a real-mode guest: port I/O exits, an MMIO write through KVM_IOEVENTFD, HLT",
  ignore: !HAVE_KVM,
  fn() {
    const kvm = openKvm();
    const vm = kvmCreateVm(kvm);
    const ram = mmapAnonymous(0x10000);
    const kick = eventfd();
    const vcpu = kvmCreateVcpu(vm, 0);
    const run = kvmMapRun(vcpu, kvmGetVcpuMmapSize(kvm));
    try {
      assert.ok(kvmCheckExtension(kvm, KVM_CAP_IOEVENTFD) > 0);
      kvmSetTssAddr(vm, 0xfffbd000);
      kvmSetUserMemoryRegion(vm, {
        slot: 0,
        guestPhysAddr: 0,
        memorySize: ram.length,
        userspaceAddr: ram.addr,
      });
      // mov dx,0x3f8; mov al,'A'; out dx,al; mov eax,7; mov [0],eax (ds base
      // 0xd0000: no memory there); out dx,al; hlt
      ram.bytes.set(
        [0xba, 0xf8, 0x03, 0xb0, 0x41, 0xee, 0x66, 0xb8, 7, 0, 0, 0, 0x66, 0xa3, 0, 0, 0xee, 0xf4],
        0x1000,
      );
      kvmIoeventfd(vm, { addr: 0xd0000, len: 4, fd: kick, datamatch: 7 });
      const s = kvmGetSregs(vcpu);
      s.cs.base = 0n;
      s.cs.selector = 0;
      s.ds.base = 0xd0000n;
      s.ds.selector = 0xd000;
      kvmSetSregs(vcpu, s);
      assert.equal(kvmGetSregs(vcpu).ds.base, 0xd0000n);
      kvmSetRegs(vcpu, { ...kvmGetRegs(vcpu), rip: 0x1000n, rflags: 2n });
      const u8 = run.bytes, dv = new DataView(run.buffer);
      const exits: string[] = [];
      for (let i = 0; i < 10; i++) {
        if (!kvmRun(vcpu)) continue;
        const reason = dv.getUint32(KVM_RUN_STRUCT.exit_reason, true);
        if (reason === KVM_EXIT_IO) {
          assert.equal(u8[KVM_RUN_STRUCT.io_direction], KVM_EXIT_IO_OUT);
          assert.equal(dv.getUint16(KVM_RUN_STRUCT.io_port, true), 0x3f8);
          const off = Number(dv.getBigUint64(KVM_RUN_STRUCT.io_data_offset, true));
          exits.push(`out ${u8[off]}`);
        } else if (reason === KVM_EXIT_HLT) {
          exits.push("hlt");
          break;
        } else {
          exits.push(`exit ${reason}`);
          break;
        }
      }
      assert.deepEqual(exits, ["out 65", "out 7", "hlt"]);
      assert.equal(eventfdRead(kick), 1, "the MMIO write signalled the ioeventfd");
      kvmIoeventfdDeassign(vm, { addr: 0xd0000, len: 4, fd: kick, datamatch: 7 });
      assert.ok(kvmGetRegs(vcpu).rip >= 0x1012n);
    } finally {
      run.unmap();
      close(vcpu);
      close(kick);
      close(vm);
      ram.unmap();
      close(kvm);
    }
  },
});
