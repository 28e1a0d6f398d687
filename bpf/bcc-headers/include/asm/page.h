/* SPDX-License-Identifier: GPL-2.0 */
/* PAGE_SIZE, which bcc's prelude uses in its map macros (fleetscope creates its maps in the
 * loader, so nothing of ours depends on it; x86-64 and arm64 4K kernels: 4 KiB). */
#ifndef FLEETSCOPE_SHIM_PAGE_H
#define FLEETSCOPE_SHIM_PAGE_H
#define PAGE_SIZE 4096
#endif
