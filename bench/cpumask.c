/* An LD_PRELOAD library that makes a process see a lesser x86 CPU: every `cpuid` it executes faults (Linux's CPUID
 * faulting, arch_prctl ARCH_SET_CPUID; a kernel feature on Intel CPUs and their VMs, `cpuid_fault` in
 * /proc/cpuinfo) and is answered here with some feature bits cleared. Every library that dispatches on cpuid
 * (torch's ATen and cpuinfo, oneDNN, MKL, fbgemm, ONNX Runtime's MLAS) then picks the kernels that CPU would run,
 * which oneDNN's ISA cap alone does not do: torch 2.13 asks cpuinfo, not oneDNN, whether to send its int8
 * products to oneDNN at all (bench/cpumask.py, README "Figures for a CPU you do not have").
 *
 * CPUMASK (read at start):
 *   avx2  clear AVX-512 (all of it), AVX-VNNI, AVX10, bf16 and AMX: an AVX2-only CPU (AMD EPYC Zen 2/3, Haswell);
 *   vnni  clear bf16 (avx512_bf16), AVX512-FP16, AVX-VNNI, AVX10 and AMX, keep AVX-512 and its VNNI: Intel
 *         Cascade Lake or Ice Lake.
 * A process that cannot turn faulting on exits 97 at start, so nothing runs unmasked by mistake.
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <dlfcn.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define BIT(n) (1u << (n))

static int keep_avx512;
static struct sigaction chained; /* a SIGSEGV handler the process installs: faults other than cpuid go there */

static long cpuid_allowed(int on) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, on); }

static void mask(uint32_t leaf, uint32_t sub, uint32_t *a, uint32_t *b, uint32_t *c, uint32_t *d) {
    if (leaf == 7 && sub == 0) {
        /* EDX: avx512_4vnniw 2, avx512_4fmaps 3, vp2intersect 8, amx_bf16 22, avx512_fp16 23, amx_tile 24, amx_int8 25 */
        *d &= ~(BIT(22) | BIT(23) | BIT(24) | BIT(25));
        if (!keep_avx512) {
            /* EBX: avx512f 16, dq 17, ifma 21, pf 26, er 27, cd 28, bw 30, vl 31 */
            *b &= ~(BIT(16) | BIT(17) | BIT(21) | BIT(26) | BIT(27) | BIT(28) | BIT(30) | BIT(31));
            /* ECX: vbmi 1, vbmi2 6, vnni 11, bitalg 12, vpopcntdq 14 */
            *c &= ~(BIT(1) | BIT(6) | BIT(11) | BIT(12) | BIT(14));
            *d &= ~(BIT(2) | BIT(3) | BIT(8));
        }
    } else if (leaf == 7 && sub == 1) {
        /* EAX: avx_vnni 4, avx512_bf16 5, amx_fp16 21, avx_ifma 23; EDX: avx_vnni_int8 4, avx_ne_convert 5, avx10 19 */
        *a &= ~(BIT(4) | BIT(5) | BIT(21) | BIT(23));
        *d &= keep_avx512 ? ~BIT(19) : ~(BIT(4) | BIT(5) | BIT(19));
    } else if (leaf == 0x1d || leaf == 0x1e || leaf == 0x24) { /* AMX tile and AVX10 leaves */
        *a = *b = *c = *d = 0;
    }
}

static void on_fault(int sig, siginfo_t *info, void *context) {
    ucontext_t *uc = context;
    greg_t *r = uc->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)r[REG_RIP];
    if (ip[0] == 0x0f && ip[1] == 0xa2) { /* cpuid: run it with faulting off, answer masked, step over it */
        uint32_t a = (uint32_t)r[REG_RAX], c = (uint32_t)r[REG_RCX], b, d, leaf = a, sub = c;
        cpuid_allowed(1);
        __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
        cpuid_allowed(0);
        mask(leaf, sub, &a, &b, &c, &d);
        r[REG_RAX] = a;
        r[REG_RBX] = b;
        r[REG_RCX] = c;
        r[REG_RDX] = d;
        r[REG_RIP] += 2;
        return;
    }
    if ((chained.sa_flags & SA_SIGINFO) && chained.sa_sigaction) {
        chained.sa_sigaction(sig, info, context);
    } else if (chained.sa_handler != SIG_DFL && chained.sa_handler != SIG_IGN) {
        chained.sa_handler(sig);
    } else {
        signal(SIGSEGV, SIG_DFL); /* a real fault: it recurs on return and ends the process as it would have */
    }
}

/* SIGSEGV stays ours (Python's faulthandler, for one, installs its own): another handler is kept and chained to */
int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    static int (*real)(int, const struct sigaction *, struct sigaction *);
    if (!real) real = (int (*)(int, const struct sigaction *, struct sigaction *))dlsym(RTLD_NEXT, "sigaction");
    if (sig == SIGSEGV && act && act->sa_sigaction != on_fault) {
        if (old) *old = chained;
        chained = *act;
        return 0;
    }
    return real(sig, act, old);
}

__attribute__((constructor)) static void start(void) {
    const char *kind = getenv("CPUMASK");
    keep_avx512 = kind && !strcmp(kind, "vnni");
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, NULL);
    if (cpuid_allowed(0) != 0) {
        static const char why[] = "cpumask: this kernel or CPU has no CPUID faulting (arch_prctl ARCH_SET_CPUID)\n";
        if (write(2, why, sizeof why - 1) < 0) _exit(97);
        _exit(97);
    }
}
