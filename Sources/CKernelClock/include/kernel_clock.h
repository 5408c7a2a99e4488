#ifndef TABSYNC_KERNEL_CLOCK_H
#define TABSYNC_KERNEL_CLOCK_H

#include <stdint.h>

/// The kernel's CLOCK_REALTIME in milliseconds since 1970, read with the clock_gettime system
/// call itself rather than through the C library or the vDSO. Every process of a machine shares
/// this one clock: a process whose view of time was changed by an LD_PRELOAD library (faketime)
/// still reads the machine's time here. Returns -1 when the call fails.
int64_t tabsync_kernel_realtime_ms(void);

#endif
