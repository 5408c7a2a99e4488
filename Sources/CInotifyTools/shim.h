#ifndef TABSYNC_CINOTIFYTOOLS_SHIM_H
#define TABSYNC_CINOTIFYTOOLS_SHIM_H

// libinotifytools (Debian: libinotifytools0-dev). Its state is process-global and
// not thread-safe: TabSync's ChangeWatcher is the one owner in a process.
#include <inotifytools/inotifytools.h>
#include <inotifytools/inotify.h>

// fstatfs(2), to tell network file systems (no inotify events from other hosts) apart.
#include <sys/vfs.h>

#endif
