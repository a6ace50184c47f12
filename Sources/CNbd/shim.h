#ifndef NBD_UMEMD_CNBD_SHIM_H
#define NBD_UMEMD_CNBD_SHIM_H
/* libnbd only: the Linux calls Swift's Glibc module hides are in Sources/CLinux. */
#include <stddef.h>
#include <stdint.h>
#include <libnbd.h>
#endif
