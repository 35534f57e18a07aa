# request guest: vCPU 0 polls the mailbox for ANSWER requests
#   req[0] = n, req[7] = sequence number,
# increments the served counter in memory (STATE_BASE[0]) and reports
# RESPONSE with args[0] = n * 1000003 + served, args[1] = served,
# args[7] = sequence number. A clone continues counting from the image's
# served counter. Other vCPUs halt.
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
    inc qword ptr [STATE_BASE]
    mov rcx, qword ptr [STATE_BASE]
    mov rax, qword ptr [rsi + SLOT_REQ]
    imul rax, rax, 1000003
    add rax, rcx
    mov qword ptr [rsi], rax
    mov qword ptr [rsi + 8], rcx
    mov rax, qword ptr [rsi + SLOT_REQ + 56]
    mov qword ptr [rsi + 56], rax
    REPORT REPORT_RESPONSE
    jmp poll

.include "puts.inc"

.section .rodata
banner: .asciz "request guest ready\n"
