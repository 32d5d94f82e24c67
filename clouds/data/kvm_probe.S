/* kiln's KVM probe: a boot sector that proves KVM runs guest code at a useful speed.
 *
 * It enters protected mode, then long mode with 2 MiB pages over the first GiB, writes 96 MiB of
 * memory eight times and runs a 50-million-step loop, then writes 0x21 to the isa-debug-exit port
 * (QEMU exits with status 67). Under TCG it finishes in under a second; a working KVM is faster;
 * a nested KVM that faults or crawls (every access trapping) does not finish in 10 s and fails.
 *
 * Rebuild kvm_probe.bin (tests/clouds/test_local.py checks the two agree):
 *   as --32 -o kvm_probe.o kvm_probe.S && objcopy -O binary -j .text kvm_probe.o kvm_probe.bin
 */
    .code16
start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $0x7c00, %sp
    lgdt gdt_desc - start + 0x7c00
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x08, $(pm32 - start + 0x7c00)
    .code32
pm32:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $0x1000, %edi       /* zero PML4, PDPT, PD at 0x1000..0x3fff */
    xor %eax, %eax
    mov $3072, %ecx
    rep stosl
    movl $0x2003, 0x1000
    movl $0x3003, 0x2000
    mov $0x3000, %edi       /* PD: 512 x 2 MiB pages = the first 1 GiB */
    mov $0x83, %eax
    mov $512, %ecx
1:  mov %eax, (%edi)
    add $0x200000, %eax
    add $8, %edi
    loop 1b
    mov $0x1000, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x20, %eax
    mov %eax, %cr4
    mov $0xC0000080, %ecx
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000000, %eax
    mov %eax, %cr0
    ljmp $0x18, $(lm64 - start + 0x7c00)
    .code64
lm64:
    /* write 96 MiB of memory from 16 MiB up, eight times over: page faults and memory traffic */
    mov $8, %r8
2:  mov $0x1000000, %rdi
    mov $(96 * 1024 * 1024 / 8), %rcx
    mov %r8, %rax
    rep stosq
    dec %r8
    jnz 2b
    /* and a plain arithmetic loop */
    mov $50000000, %rcx
    xor %rax, %rax
3:  add %rcx, %rax
    dec %rcx
    jnz 3b
    mov $0x21, %al
    out %al, $0xf4
4:  hlt
    jmp 4b
    .p2align 3
gdt:
    .quad 0
    .quad 0x00CF9A000000FFFF
    .quad 0x00CF92000000FFFF
    .quad 0x00AF9A000000FFFF
gdt_desc:
    .word gdt_desc - gdt - 1
    .long gdt - start + 0x7c00
    .org 510
    .byte 0x55, 0xaa
