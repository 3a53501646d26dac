/* The tiny guest of the tests against the real Firecracker: an ELF that
 * Firecracker boots through PVH (the XEN_ELFNOTE_PHYS32_ENTRY note names its
 * 32-bit entry), which writes one line to the serial port 0x3f8 and then
 * either resets through the i8042 controller (port 0x64, 0xfe), after which
 * Firecracker exits 0, or, assembled with --defsym STAY=1, halts for good
 * with interrupts off, so the VM runs until it is stopped.
 *
 *   as --64 [--defsym STAY=1] -o tiny.o tiny-pvh.S
 *   ld -m elf_x86_64 -nostdlib -static -Ttext=0x100000 -e start -o tiny.elf tiny.o
 */
        .section .note.Xen, "a", @note
        .balign 4
        .long 4                 /* namesz */
        .long 4                 /* descsz */
        .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz "Xen"
        .balign 4
        .long start
        .balign 4

        .text
        .code32
        .globl start
start:
        cli
        mov $msg, %esi
        mov $0x3f8, %dx
1:      movb (%esi), %al
        test %al, %al
        jz 2f
        outb %al, %dx
        inc %esi
        jmp 1b
2:
.ifndef STAY
        mov $0xfe, %al
        outb %al, $0x64
.endif
3:      hlt
        jmp 3b
msg:    .asciz "sandcast tiny guest: hello\n"
