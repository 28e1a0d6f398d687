/* SPDX-License-Identifier: GPL-2.0 */
/* The running kernel's version, passed by the loader (-DFS_LINUX_VERSION_CODE from uname). */
#ifndef FLEETSCOPE_SHIM_VERSION_H
#define FLEETSCOPE_SHIM_VERSION_H
#define KERNEL_VERSION(a, b, c) (((a) << 16) + ((b) << 8) + ((c) > 255 ? 255 : (c)))
#ifdef FS_LINUX_VERSION_CODE
#define LINUX_VERSION_CODE FS_LINUX_VERSION_CODE
#else
#define LINUX_VERSION_CODE 0
#endif
#endif
