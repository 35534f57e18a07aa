# counter guest: every vCPU increments a register counter (r12) and a memory
# counter (STATE_BASE + 8 * vCPU) and folds the counter into a hash (r13)
# forever; every (mask + 1) iterations it reports PROGRESS with
#   args[0] = r12, args[1] = memory counter, args[2] = r13, args[3] = vCPU.
# A clone that resumed at the exact instruction with the exact state keeps
# r12 == memory counter and r13 == hash(r12) and continues past the
# captured values. The mask is PARAMS_BASE[0].
.include "common.inc"
.section .text.start, "ax"
.global _start
_start:
    mov rbx, rdi
    lea r15, [rdi * 8 + STATE_BASE]
    test rdi, rdi
    jnz 1f
    lea r8, [rip + banner]
    call puts
1:  mov qword ptr [rsi], rbx
    REPORT REPORT_READY
    mov r14, qword ptr [PARAMS_BASE]
    mov r10, 0x100000001b3          # FNV prime
    xor r12, r12
    mov r13, 0xcbf29ce484222325     # FNV offset basis
count:
    inc r12
    inc qword ptr [r15]
    xor r13, r12
    imul r13, r10
    test r12, r14
    jnz count
    mov qword ptr [rsi], r12
    mov rax, qword ptr [r15]
    mov qword ptr [rsi + 8], rax
    mov qword ptr [rsi + 16], r13
    mov qword ptr [rsi + 24], rbx
    REPORT REPORT_PROGRESS
    jmp count

.include "puts.inc"

.section .rodata
banner: .asciz "counter guest ready\n"
