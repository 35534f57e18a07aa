# memory guest: vCPU 0 polls the mailbox for TOUCH requests
#   req[0] base page (RAM page index), req[1] page count, req[2] pattern
#   (0 sequential, 1 random, 2 hot-cold), req[3] region pages, req[4] stride,
#   req[5] marker (0 = read only, else written to each page after reading),
#   req[6] xorshift seed (non-zero), req[7] sequence number,
# reads one qword at offset 0 of each touched page and reports RESULT with
#   args[0] = sum of the qwords, args[1] = xor of the qwords,
#   args[2] = pages touched, args[7] = sequence number.
# Page choice (must match guests::touch_pages on the host), for i in 0..count:
#   sequential: idx = (i * stride) mod region (running position)
#   random:     x = xorshift64(x); idx = x mod region
#   hot-cold:   x = xorshift64(x); if (x & 0xff) < 230: idx = (x >> 8) mod hot
#               else idx = (x >> 8) mod region, where hot = max(region >> 3, 1)
#   page = base + idx; RAM pages from 3 GiB on live 1 GiB higher (MMIO hole).
# A sequential read-only touch that does not wrap and stays below the hole
# takes a 6-instruction loop (instructions are emulated at ~1 us each here).
# Other vCPUs halt.
.include "common.inc"
.section .text.start, "ax"
.global _start
_start:
    PARK_IF_NOT_BSP
    lea r8, [rip + banner]
    call puts
    mov qword ptr [rsi], 0
    REPORT REPORT_READY
poll:
    mov dx, PORT_REQUEST
    in eax, dx
    test eax, eax
    jz poll
    mov r8,  qword ptr [rsi + SLOT_REQ + 0]
    mov r9,  qword ptr [rsi + SLOT_REQ + 8]
    mov r10, qword ptr [rsi + SLOT_REQ + 16]
    mov r11, qword ptr [rsi + SLOT_REQ + 24]
    mov r12, qword ptr [rsi + SLOT_REQ + 32]
    mov r13, qword ptr [rsi + SLOT_REQ + 40]
    mov r14, qword ptr [rsi + SLOT_REQ + 48]
    mov rax, r11
    shr rax, 3
    jnz 1f
    inc rax
1:  mov rdi, rax                    # hot pages (rdi is free on vCPU 0)
    xor ecx, ecx                    # i
    xor ebx, ebx                    # sum
    xor ebp, ebp                    # xor
    xor r15d, r15d                  # sequential position
    # Fast path (same pages, same result, 6 instructions a page instead of
    # ~19): sequential, read-only, no wrap, region below the MMIO hole.
    test r10, r10
    jnz touch
    test r13, r13
    jnz touch
    test r9, r9
    jz touch
    mov rax, r8
    add rax, r11
    cmp rax, MMIO_HOLE_PAGE
    ja touch
    mov rax, r9
    dec rax
    imul rax, r12
    cmp rax, r11
    jae touch
    mov rax, r8
    shl rax, 12
    mov r15, r12
    shl r15, 12
    mov rcx, r9
stream:
    mov rdx, qword ptr [rax]
    add rbx, rdx
    xor rbp, rdx
    add rax, r15
    dec rcx
    jnz stream
    jmp done
touch:
    cmp rcx, r9
    jae done
    test r10, r10
    jnz random
    mov rax, r15
    add r15, r12
    cmp r15, r11
    jb page
    sub r15, r11
    jmp page
random:
    mov rdx, r14
    shl rdx, 13
    xor r14, rdx
    mov rdx, r14
    shr rdx, 7
    xor r14, rdx
    mov rdx, r14
    shl rdx, 17
    xor r14, rdx
    mov rax, r14
    cmp r10, 1
    je 2f
    cmp al, 230
    jae 3f
    shr rax, 8
    xor edx, edx
    div rdi
    mov rax, rdx
    jmp page
3:  shr rax, 8
2:  xor edx, edx
    div r11
    mov rax, rdx
page:
    add rax, r8
    cmp rax, MMIO_HOLE_PAGE
    jb 4f
    add rax, MMIO_HOLE_PAGES
4:  shl rax, 12
    mov rdx, qword ptr [rax]
    add rbx, rdx
    xor rbp, rdx
    test r13, r13
    jz 5f
    mov qword ptr [rax], r13
5:  inc rcx
    jmp touch
done:
    mov qword ptr [rsi], rbx
    mov qword ptr [rsi + 8], rbp
    mov qword ptr [rsi + 16], r9
    mov rax, qword ptr [rsi + SLOT_REQ + 56]
    mov qword ptr [rsi + 56], rax
    REPORT REPORT_RESULT
    jmp poll

.include "puts.inc"

.section .rodata
banner: .asciz "memory guest ready\n"
