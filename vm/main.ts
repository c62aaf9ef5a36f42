/**
 * `deno task vm -- --image disk.img [options]`: boot the test guest on the
 * image in a KVM VM served by the dataplane (vm/kvm_vm.ts) and exit with the
 * guest's status: 0 when its workload passed, 1 when it failed, never wrote
 * the exit port, or did not finish within --timeout; 2 on a usage error.
 *
 * @module
 */

import { taskArgs, UsageError } from "../dataplane/mod.ts";
import { buildGuest, DEFAULT_GUEST_DIR, DEFAULT_GUEST_SOURCES } from "./guest_image.ts";
import { KvmVm } from "./kvm_vm.ts";
import { TEST_F_NO_VERIFY, TEST_F_QUICK } from "./test_device.ts";
import { parseVmArgs, VM_USAGE, type VmCliOptions } from "./vm_options.ts";

function log(line: string): void {
  const t = new Date().toISOString().slice(11, 23);
  console.error(`${t} vm: ${line}`);
}

/** Runs the guest; returns the exit status. */
export async function main(args: string[]): Promise<number> {
  let o: VmCliOptions;
  try {
    o = parseVmArgs(args);
  } catch (e) {
    if (!(e instanceof UsageError)) throw e;
    console.error(`vm: ${e.message}\nTry --help.`);
    return 2;
  }
  if (o.help) {
    console.log(VM_USAGE);
    return 0;
  }
  let guest: Uint8Array;
  try {
    guest = o.guest !== null
      ? await Deno.readFile(o.guest)
      : await buildGuest(DEFAULT_GUEST_DIR, DEFAULT_GUEST_SOURCES);
  } catch (e) {
    console.error(`vm: guest: ${(e as Error).message}`);
    return 1;
  }
  const b = o.host.block;
  let flags = o.quick ? TEST_F_QUICK : 0;
  if (b.driver !== "file") flags |= TEST_F_NO_VERIFY;
  let vm: KvmVm;
  try {
    vm = await KvmVm.start({
      host: o.host,
      guest,
      ramSize: o.ramSize,
      ioeventfd: o.notify === "ioeventfd",
      irqfd: o.irq === "irqfd",
      testFlags: flags,
    }, log);
  } catch (e) {
    console.error(`vm: ${(e as Error).message}`);
    return 1;
  }
  const image = b.driver === "file" ? b.filename : `${b.driver}:${b.size}`;
  log(
    `booting the guest on ${image} (cache=${b.cache}, aio=${b.aio}${
      b.readOnly ? ", read-only" : ""
    }, ${o.host.iothreads} IOThread(s), notify ${o.notify}, irq ${o.irq})`,
  );
  // A guest that never finishes keeps its vCPU in KVM_RUN, which nothing
  // but an exit interrupts: on timeout the process ends.
  const timer = setTimeout(async () => {
    log(`timeout: the guest did not finish in ${o.timeoutMs / 1000} s`);
    const stuck = await vm.snapshot({ stopped: false, reason: "timeout" }).catch(() => null);
    if (stuck !== null) log(`counters\n${KvmVm.formatResult(stuck)}`);
    Deno.exit(1);
  }, o.timeoutMs);
  void vm.failed.then((e) => {
    // An IOThread's loop died (a bug): the guest would wait for ever.
    log(`fatal: ${e.message}`);
    Deno.exit(1);
  });
  const result = await vm.run();
  clearTimeout(timer);
  await vm.close();
  log(`guest ${result.end.stopped ? "stopped" : "failed"}: ${result.end.reason}`);
  log(`counters\n${KvmVm.formatResult(result)}`);
  if (result.exitStatus === null) {
    log("FAIL: the guest never wrote its exit status");
    return 1;
  }
  log(`guest exit status ${result.exitStatus}: ${result.exitStatus === 0 ? "PASS" : "FAIL"}`);
  return result.exitStatus === 0 ? 0 : 1;
}

if (import.meta.main) Deno.exit(await main(taskArgs(Deno.args)));
