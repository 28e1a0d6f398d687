/* SPDX-License-Identifier: GPL-2.0 */
/* bcc includes this first (-include ./include/linux/kconfig.h). Its prelude refuses to
 * compile without CONFIG_BPF_SYSCALL, which a kernel that loads BPF programs has. */
#ifndef FLEETSCOPE_SHIM_KCONFIG_H
#define FLEETSCOPE_SHIM_KCONFIG_H
#define CONFIG_BPF_SYSCALL 1
#endif
