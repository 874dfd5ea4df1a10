# cython: language_level=3
# Copying int32 arrays (KV slot indices, token ids) without glibc's 4 KiB-aliasing cliff,
# and checking their range (at the end).
#
# From a few KB up, glibc's memcpy and memmove (2.36 on the development machine) copy with
# `rep movsb`. On AMD Zen 3 (the development machine's EPYC) that instruction runs about 30x
# slower when the destination starts 1-31 bytes past the source modulo 4 KiB (a 4 KB copy:
# 57-87 ns, and 2.1-2.5 us at those offsets; bench/bench_radix_cache.py::
# test_copy_at_4k_alias). Which offsets two buffers get is up to malloc, and a serving loop
# that keeps reusing the same few blocks can land on a bad one on every request (a
# steady-state match_prefix of a 1,280-token prefix: 2.2-3.9 us a call instead of 1.2).
#
# In that window, on AMD x86-64 processors, copy32 (distinct arrays) and move32_down (a move
# to a lower address within one array: a split node keeping its tail, the allocator
# compacting its free list, where the cliff shows when the shift is 1-31 bytes short of a
# multiple of 4 KiB; 16 KB: 5.6-7.0 us instead of 0.24) copy forward in 128-byte steps,
# each step's four loads before its four stores (4 KB: 61-95 ns; 64 KB: 1.5 us against
# memcpy's 22 us). Everywhere else they are memcpy and memmove: on an Intel Sapphire Rapids
# host glibc's copy has no such cliff and the stepped loop was the slower one (64 KB at
# 16 bytes: 5.2 us against 2.9), and other architectures have no `rep movsb`. The vendor is
# read once (cpuid, through GCC's __builtin_cpu_is); tests force either path with
# pymllm_copy32_set_mode. The loop is compiled with GCC's loop-to-memcpy rewrite off (or it
# would call memcpy again), for AVX2 and the baseline. Header-only: each module that
# cimports it compiles its own copy (and has its own mode).

from libc.stdint cimport int32_t, uint32_t


cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #if defined(__GNUC__)  /* GCC and clang: vector types */
    #if !defined(__clang__)
    __attribute__((optimize("no-tree-loop-distribute-patterns")))
    #if defined(__x86_64__) && defined(__GLIBC__)
    __attribute__((target_clones("avx2", "default")))
    #endif
    #endif
    static void pymllm_copy32_steps(void* dst, const void* src, Py_ssize_t n) {
        /* Forward, 128 bytes a step, the step's loads before its stores: with dst <= src
           the stores end below src + i + 128, so an overlapping move never overwrites a
           byte before it is loaded. */
        typedef int32_t pymllm_v8 __attribute__((vector_size(32)));
        char* d = (char*)dst;
        const char* s = (const char*)src;
        Py_ssize_t i = 0, nb = n * 4;
        pymllm_v8 a, b, c, e;
        for (; i + 128 <= nb; i += 128) {
            __builtin_memcpy(&a, s + i, 32);
            __builtin_memcpy(&b, s + i + 32, 32);
            __builtin_memcpy(&c, s + i + 64, 32);
            __builtin_memcpy(&e, s + i + 96, 32);
            __builtin_memcpy(d + i, &a, 32);
            __builtin_memcpy(d + i + 32, &b, 32);
            __builtin_memcpy(d + i + 64, &c, 32);
            __builtin_memcpy(d + i + 96, &e, 32);
        }
        for (; i < nb; i += 4)
            __builtin_memcpy(d + i, s + i, 4);
    }

    /* Whether the stepped loop replaces memcpy in the aliasing window: -1 not decided yet,
       then 1 on AMD x86-64 and 0 elsewhere (pymllm_copy32_set_mode overrides it). */
    static int pymllm_copy_steps = -1;

    static int pymllm_copy_steps_default(void) {
    #if defined(__x86_64__) && (defined(__clang__) || __GNUC__ >= 5)
        __builtin_cpu_init();
        return __builtin_cpu_is("amd") ? 1 : 0;
    #else
        return 0;
    #endif
    }

    /* mode: 1 the stepped loop in the window, 0 always memcpy, -1 by vendor (the default).
       Returns the mode in force before the call. */
    static int pymllm_copy32_set_mode(int mode) {
        int before = pymllm_copy_steps < 0 ? pymllm_copy_steps_default() : pymllm_copy_steps;
        pymllm_copy_steps = mode < 0 ? pymllm_copy_steps_default() : (mode != 0);
        return before;
    }

    /* rep movsb is slow when dst is 1-31 bytes past src modulo 4 KiB; the window is taken
       as 1-63 bytes for a margin, and under 2 KiB glibc does not use rep movsb. */
    static inline int pymllm_4k_alias(const void* dst, const void* src, Py_ssize_t n) {
        if (n < 512 || ((((uintptr_t)dst - (uintptr_t)src) & 4095u) - 1u) >= 63u)
            return 0;
        if (__builtin_expect(pymllm_copy_steps < 0, 0))
            pymllm_copy_steps = pymllm_copy_steps_default();
        return pymllm_copy_steps;
    }

    static inline void pymllm_copy32(void* dst, const void* src, Py_ssize_t n) {
        if (n <= 0)  /* a node with no slots (the root) has none to point at: NULL */
            return;
        if (pymllm_4k_alias(dst, src, n))
            pymllm_copy32_steps(dst, src, n);
        else
            memcpy(dst, src, (size_t)n * sizeof(int32_t));
    }

    static inline void pymllm_move32_down(void* dst, const void* src, Py_ssize_t n) {
        if (n <= 0)
            return;
        if (pymllm_4k_alias(dst, src, n))
            pymllm_copy32_steps(dst, src, n);
        else
            memmove(dst, src, (size_t)n * sizeof(int32_t));
    }
    #else
    static int pymllm_copy32_set_mode(int mode) {
        (void)mode;
        return 0;
    }
    static inline void pymllm_copy32(void* dst, const void* src, Py_ssize_t n) {
        if (n > 0)
            memcpy(dst, src, (size_t)n * sizeof(int32_t));
    }
    static inline void pymllm_move32_down(void* dst, const void* src, Py_ssize_t n) {
        if (n > 0)
            memmove(dst, src, (size_t)n * sizeof(int32_t));
    }
    #endif
    """
    # Copies n 4-byte elements (int32 or uint32) from src to dst; they must not overlap.
    void copy32 "pymllm_copy32" (void* dst, const void* src, Py_ssize_t n) noexcept nogil
    # memmove of n 4-byte elements to a lower address (dst <= src; they may overlap).
    void move32_down "pymllm_move32_down" (void* dst, const void* src, Py_ssize_t n) noexcept nogil
    # Which copy the aliasing window takes (1 stepped loop, 0 memcpy, -1 by CPU vendor, the
    # default); returns the mode in force before. For tests and benchmarks.
    int copy32_set_mode "pymllm_copy32_set_mode" (int mode) noexcept nogil


# Index of the first entry of p[0:n] outside [lo, lo + span), n if none (lo >= 0 and
# lo + span <= 2**31): the entries' sign bits OR-ed together (lo 0, span 2**31: "not
# negative"), or else the largest p[i] - lo taken unsigned (a negative entry wraps to
# 2**31 - lo or more), without a branch, which the compiler vectorises and unrolls; the
# search for the index runs only on bad input. It reads every token of every key and value
# the radix tree takes (span 2**31: "not negative") and every prefix the allocators copy,
# so on x86-64 GCC builds against glibc it is compiled twice, for AVX2 and for the
# baseline, and the loader picks one for the CPU it runs on (an ifunc; musl has none).
cdef extern from *:
    """
    #if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__)
    __attribute__((target_clones("avx2", "default")))
    #endif
    static Py_ssize_t pymllm_first_outside(const int32_t* p, Py_ssize_t n, int32_t lo,
                                           uint32_t span) {
        uint32_t bad = 0;
        Py_ssize_t i;
        if (lo == 0 && span == 0x80000000u) {
            /* "not negative": the sign bit of the entries OR-ed together, one vector OR
               per vector of entries, unrolled so that the loop's own count and branch
               do not cost as much as the ORs */
            int32_t acc = 0;
            #pragma GCC unroll 4
            for (i = 0; i < n; i++)
                acc |= p[i];
            bad = acc < 0;
        } else {
            /* the largest p[i] - lo, unsigned (a negative entry wraps to 2**31 - lo or
               more): one vector subtract and max per vector of entries */
            uint32_t top = 0;
            #pragma GCC unroll 4
            for (i = 0; i < n; i++) {
                uint32_t d = (uint32_t)p[i] - (uint32_t)lo;
                top = d > top ? d : top;
            }
            bad = top >= span;
        }
        if (!bad)
            return n;
        for (i = 0; i < n; i++)
            if ((uint32_t)p[i] - (uint32_t)lo >= span)
                return i;
        return n;
    }
    """
    Py_ssize_t first_outside "pymllm_first_outside" (
        const int32_t* p, Py_ssize_t n, int32_t lo, uint32_t span) noexcept nogil
