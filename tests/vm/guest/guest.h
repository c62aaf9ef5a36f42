/* Shared declarations of the freestanding test guest (see guest.c). */
#ifndef GUEST_H
#define GUEST_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

/* The host's test ports (vm/test_device.ts). */
#define PORT_EXIT 0x501     /* write: the guest is done, value = exit status */
#define PORT_CLOCK_LO 0x504 /* read: host monotonic ns, low half (latches the high half) */
#define PORT_CLOCK_HI 0x508 /* read: the latched high half */
#define PORT_FLAGS 0x50c    /* read: TEST_F_* */
#define TEST_F_NO_VERIFY 1  /* data is not stored (null driver): skip content checks */
#define TEST_F_QUICK 2      /* fewer timed requests */

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) {
  u8 v;
  __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
  return v;
}
static inline u32 inl(u16 port) {
  u32 v;
  __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
  return v;
}
static inline u64 rdtsc(void) {
  u32 lo, hi;
  __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
  return ((u64)hi << 32) | lo;
}
static inline void mmio_write32(u32 addr, u32 v) { *(volatile u32 *)addr = v; }
static inline u32 mmio_read32(u32 addr) { return *(volatile u32 *)addr; }
#define barrier() __asm__ volatile("" ::: "memory")
#define mb() __asm__ volatile("mfence" ::: "memory")

void putc_serial(char c);
void puts_serial(const char *s);
void printf_serial(const char *fmt, ...);
void guest_exit(u32 status) __attribute__((noreturn));
u64 host_clock_ns(void);
void *memset(void *d, int c, unsigned n);
void *memcpy(void *d, const void *s, unsigned n);
int memcmp(const void *a, const void *b, unsigned n);

/* Interrupts (guest.c): the in-kernel 8259 with IRQ 5 at vector 0x25. */
extern volatile u32 irq_count;
extern void (*volatile irq_hook)(void);
void irq_init(void);
void pic_eoi(void);

#endif
