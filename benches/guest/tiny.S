/*
 * The benchmark's minimal guest: a PVH ELF kernel that prints one line on COM1 and ends the
 * VM through the i8042 reset line (podvm, Firecracker, Cloud Hypervisor), falling back to a
 * triple fault (QEMU with -no-reboot). Integer instructions only, so it also runs at CPL0
 * under PVM, which cannot run a stock kernel.
 */
#define XEN_ELFNOTE_PHYS32_ENTRY 18
#define COM1 0x3f8
#define I8042_COMMAND 0x64
#define I8042_PULSE_RESET 0xfe

	.section .note.Xen, "a"
	.balign 4
	.long 4				/* name size: "Xen\0" */
	.long 4				/* descriptor size */
	.long XEN_ELFNOTE_PHYS32_ENTRY
	.asciz "Xen"
	.long pvh_start

	.text
	.code32
	.globl pvh_start
pvh_start:
	mov $COM1, %dx
	mov $message, %esi
1:	movb (%esi), %al
	test %al, %al
	jz 2f
	outb %al, %dx
	inc %esi
	jmp 1b
2:
#ifdef HALT_AFTER_PRINT
	/* The memory benchmark's variant: stay alive, idle, so the VMM can be measured. */
	cli
3:	hlt
	jmp 3b
#endif
	mov $I8042_PULSE_RESET, %al
	outb %al, $I8042_COMMAND
	lidt empty_idt			/* no handlers: the next fault triple-faults */
	ud2

	.section .rodata
message:
	.asciz "podvm-bench: guest says hello\n"
	.balign 8
empty_idt:
	.word 0
	.long 0
