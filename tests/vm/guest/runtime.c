/*
 * The test guest's runtime: entry in 32-bit protected mode (the host set
 * flat segments through KVM_SET_SREGS; we load our own GDT so interrupts
 * and iret find valid descriptors), serial output on the 8250 at 0x3f8,
 * printf, the IDT with a handler for IRQ 5 (the virtio-mmio device's GSI,
 * driven by the host's KVM_IRQFD through the in-kernel 8259), and the exit
 * port.
 */
#include "guest.h"

__asm__(
    ".section .text.start, \"ax\"\n"
    ".globl _start\n"
    "_start:\n"
    "  cli\n"
    "  lgdt gdt_desc\n"
    "  ljmp $0x08, $1f\n"
    "1:\n"
    "  mov $0x10, %ax\n"
    "  mov %ax, %ds\n"
    "  mov %ax, %es\n"
    "  mov %ax, %fs\n"
    "  mov %ax, %gs\n"
    "  mov %ax, %ss\n"
    "  mov $stack_top, %esp\n"
    "  call main\n"
    "  push %eax\n"
    "  call guest_exit\n"
    ".text\n");

static u64 gdt[3] __attribute__((aligned(8))) = {
    0,
    0x00cf9a000000ffffULL, /* 0x08: code, base 0, limit 4 GiB, 32-bit */
    0x00cf92000000ffffULL, /* 0x10: data */
};
struct __attribute__((packed)) dtr {
  u16 limit;
  u32 base;
};
struct dtr gdt_desc = {sizeof(gdt) - 1, (u32)gdt};

u8 guest_stack[65536] __attribute__((aligned(16)));
__asm__(".globl stack_top\n.set stack_top, guest_stack + 65536\n");

#define COM1 0x3f8

void putc_serial(char c) {
  while (!(inb(COM1 + 5) & 0x20)) {
  }
  outb(COM1, (u8)c);
}

void puts_serial(const char *s) {
  while (*s) putc_serial(*s++);
}

void guest_exit(u32 status) {
  for (;;) outl(PORT_EXIT, status);
}

u64 host_clock_ns(void) {
  u32 lo = inl(PORT_CLOCK_LO);
  u32 hi = inl(PORT_CLOCK_HI);
  return ((u64)hi << 32) | lo;
}

void *memset(void *d, int c, unsigned n) {
  u8 *p = d;
  while (n--) *p++ = (u8)c;
  return d;
}
void *memcpy(void *d, const void *s, unsigned n) {
  u8 *p = d;
  const u8 *q = s;
  while (n--) *p++ = *q++;
  return d;
}
int memcmp(const void *a, const void *b, unsigned n) {
  const u8 *p = a, *q = b;
  for (; n; n--, p++, q++)
    if (*p != *q) return *p - *q;
  return 0;
}

static void put_u64(u64 v, unsigned base, int width) {
  char buf[24];
  int i = 0;
  do {
    u32 d;
    /* 64-bit division without libgcc: by repeated subtraction of shifted base */
    u64 q = 0, r = v;
    for (int s = 63; s >= 0; s--) {
      if ((r >> s) >= base) {
        r -= (u64)base << s;
        q |= 1ULL << s;
      }
    }
    d = (u32)r;
    buf[i++] = "0123456789abcdef"[d];
    v = q;
  } while (v && i < 24);
  while (i < width) buf[i++] = '0';
  while (i) putc_serial(buf[--i]);
}

/* %s %c %u %d %x %llu %llx, width digits for %x only via %08x */
void printf_serial(const char *fmt, ...) {
  __builtin_va_list ap;
  __builtin_va_start(ap, fmt);
  for (; *fmt; fmt++) {
    if (*fmt != '%') {
      putc_serial(*fmt);
      continue;
    }
    fmt++;
    int width = 0;
    if (*fmt == '0') {
      fmt++;
      while (*fmt >= '0' && *fmt <= '9') width = width * 10 + (*fmt++ - '0');
    }
    int ll = 0;
    while (*fmt == 'l') {
      ll++;
      fmt++;
    }
    switch (*fmt) {
      case 's': puts_serial(__builtin_va_arg(ap, const char *)); break;
      case 'c': putc_serial((char)__builtin_va_arg(ap, int)); break;
      case 'd': {
        long long v = ll >= 2 ? __builtin_va_arg(ap, long long) : __builtin_va_arg(ap, int);
        if (v < 0) {
          putc_serial('-');
          v = -v;
        }
        put_u64((u64)v, 10, width);
        break;
      }
      case 'u': put_u64(ll >= 2 ? __builtin_va_arg(ap, u64) : __builtin_va_arg(ap, u32), 10, width); break;
      case 'x': put_u64(ll >= 2 ? __builtin_va_arg(ap, u64) : __builtin_va_arg(ap, u32), 16, width); break;
      default: putc_serial('%'); putc_serial(*fmt);
    }
  }
  __builtin_va_end(ap);
}

/* ---- interrupts ---- */

struct __attribute__((packed)) idt_entry {
  u16 off_lo, sel;
  u8 zero, type;
  u16 off_hi;
};
static struct idt_entry idt[256] __attribute__((aligned(8)));
static struct dtr idt_desc = {sizeof(idt) - 1, (u32)idt};

volatile u32 irq_count;
void (*volatile irq_hook)(void);

#define PIC1 0x20
#define PIC2 0xa0
#define IRQ_BASE 0x20
#define VIRTIO_IRQ 5

void pic_eoi(void) { outb(PIC1, 0x20); }

void irq5_c(void) {
  irq_count++;
  if (irq_hook) irq_hook();
  pic_eoi();
}

void trap_c(u32 eip) {
  printf_serial("FAIL: unexpected trap or interrupt at eip %x\n", eip);
  guest_exit(3);
}

void spurious_c(void) { /* IRQ 7 from the 8259 with nothing in service: no EOI */ }

__asm__(
    ".globl irq5_stub\n"
    "irq5_stub:\n"
    "  pusha\n"
    "  cld\n"
    "  call irq5_c\n"
    "  popa\n"
    "  jmp iret_by_hand\n"
    /*
     * iret without iret: KVM's instruction emulator, which runs this guest
     * on a host without hardware virtualization (kvm_pvm emulates every
     * non-64-bit guest), implements iret in real mode only and stops the
     * vCPU with an emulation failure on a protected-mode one. The frame
     * holds EIP, CS, EFLAGS (no privilege change): restore EFLAGS with
     * popf and return with ret. The interrupted code ran with IF set (the
     * interrupt was delivered), so popf sets it again.
     */
    "iret_by_hand:\n"
    "  push %eax\n"            /* [eax][eip][cs][eflags] */
    "  mov 4(%esp), %eax\n"
    "  xchg %eax, 12(%esp)\n"  /* [eax][eip][cs][eip], eax = eflags */
    "  mov %eax, 8(%esp)\n"    /* [eax][eip][eflags][eip] */
    "  pop %eax\n"
    "  add $4, %esp\n"         /* [eflags][eip] */
    "  popf\n"
    "  ret\n"
    ".globl trap_stub\n"
    "trap_stub:\n"
    "  mov 0(%esp), %eax\n"
    "  push %eax\n"
    "  call trap_c\n"
    ".globl spurious_stub\n"
    "spurious_stub:\n"
    "  pusha\n"
    "  call spurious_c\n"
    "  popa\n"
    "  jmp iret_by_hand\n");
extern char irq5_stub[], trap_stub[], spurious_stub[];

static void set_gate(int v, void *fn) {
  u32 a = (u32)fn;
  idt[v].off_lo = a & 0xffff;
  idt[v].off_hi = a >> 16;
  idt[v].sel = 0x08;
  idt[v].zero = 0;
  idt[v].type = 0x8e; /* present, DPL 0, 32-bit interrupt gate */
}

void irq_init(void) {
  for (int v = 0; v < 256; v++) set_gate(v, trap_stub);
  set_gate(IRQ_BASE + VIRTIO_IRQ, irq5_stub);
  set_gate(IRQ_BASE + 7, spurious_stub);
  set_gate(IRQ_BASE + 8 + 7, spurious_stub);
  __asm__ volatile("lidt %0" ::"m"(idt_desc));
  /* 8259 pair: edge triggered, vectors 0x20-0x2f, only IRQ 5 unmasked */
  outb(PIC1, 0x11);
  outb(PIC2, 0x11);
  outb(PIC1 + 1, IRQ_BASE);
  outb(PIC2 + 1, IRQ_BASE + 8);
  outb(PIC1 + 1, 4);
  outb(PIC2 + 1, 2);
  outb(PIC1 + 1, 1);
  outb(PIC2 + 1, 1);
  outb(PIC1 + 1, (u8) ~(1 << VIRTIO_IRQ));
  outb(PIC2 + 1, 0xff);
}
