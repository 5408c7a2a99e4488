#include "kernel_clock.h"

#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

int64_t tabsync_kernel_realtime_ms(void) {
    struct timespec now;
    if (syscall(SYS_clock_gettime, CLOCK_REALTIME, &now) != 0) return -1;
    return (int64_t)now.tv_sec * 1000 + now.tv_nsec / 1000000;
}
