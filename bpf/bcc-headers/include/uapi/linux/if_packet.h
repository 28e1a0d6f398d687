/* SPDX-License-Identifier: GPL-2.0 */
/* Included by bcc's prelude; nothing of it is used (bcc brings its own bpf.h). */
