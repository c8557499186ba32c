/* kvrepl's kernel threads: a small pool that runs a job's items, for kernels.c.
 *
 * A job is n items (fixed chunks of outputs, cut the same way whatever the thread count, so no
 * output's arithmetic depends on it). The items are cut into one contiguous run per thread (the
 * caller's too): each thread claims its own run's items one at a time from the run's counter, in
 * order, then helps with the others' runs. So each thread streams through one stretch of a weight
 * matrix (items taken in turn from one counter had two threads reading alternate 16 KB pieces,
 * and a 1B-shape decode step took 39 ms instead of 24 on a 2-core Zen 4). The caller then waits
 * only for items already claimed. A thread that is late, its core taken by another process, costs
 * the job nothing unless it holds an item: there is no barrier where every thread must check in,
 * as an OpenMP parallel region has.
 *
 * Idle workers spin for SPIN_NS (a decode step's jobs come a few microseconds apart), then sleep
 * on a futex, so an idle kvrepl leaves the cores to others. How many threads a job uses: torch's
 * (omp_get_max_threads, which torch.set_num_threads sets), fewer while other processes keep cores
 * busy (measured from /proc/stat every LOAD_NS): a thread whose core is taken only waits there.
 * And torch's own OpenMP threads are kept from spinning where the kernel threads run (park).
 */
#define _GNU_SOURCE
#include <limits.h>
#include <omp.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#endif

typedef int64_t i64;
typedef void (*kv_task)(const void *ctx, i64 item);

#define SPIN_NS 200000      /* an idle worker spins this long before it sleeps */
#define WAIT_SPINS 2048     /* the caller spins this many pauses for claimed items, then yields */
#define LOAD_NS 100000000   /* how often the other processes' load is measured */
#define MAX_WORKERS 255

static struct {
    pthread_mutex_t owner;     /* one caller runs a job at a time; another runs its job alone */
    _Atomic uint32_t seq;      /* 2 x the job number; odd while a job is being set up */
    _Atomic(kv_task) fn;
    _Atomic(const void *) ctx;
    _Atomic int want;          /* workers 1..want take part */
    _Atomic int runs;          /* the job's items are cut into this many runs (threads) */
    _Atomic i64 done __attribute__((aligned(64))); /* items of the current job finished */
    _Atomic int sleepers;
    _Atomic i64 worker_items;  /* items workers ran, ever (the tests look) */
    int workers;               /* started */
    int adapt;                 /* fewer threads while other processes are busy */
    int fixed;                 /* > 0: exactly this many threads (tests, benchmarks) */
} P = {.owner = PTHREAD_MUTEX_INITIALIZER, .adapt = 1};

/* Run r of the current job: items [first, end), claimed in order; each on its own cache line. */
static struct {
    _Atomic uint64_t claim; /* job number << 32 | next item */
    _Atomic i64 end;
} __attribute__((aligned(64))) R[MAX_WORKERS + 1];

static inline void cpu_pause(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static i64 now_ns(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (i64)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void sleep_on(_Atomic uint32_t *addr, uint32_t val) {
#ifdef __linux__
    syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAIT_PRIVATE, val, NULL, NULL, 0);
#else
    (void)addr, (void)val;
    struct timespec ts = {0, 50000};
    nanosleep(&ts, NULL);
#endif
}

static void wake_all(_Atomic uint32_t *addr) {
#ifdef __linux__
    syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
#else
    (void)addr;
#endif
}

/* Claim and run items of job `job` until none is left, run `me` first, then the runs after it;
 * returns how many this thread ran. A claim's compare-and-swap checks the job number, so a thread
 * that reads a run's end as the next job sets it up cannot take an item of that job, nor (the
 * claim is set before the end: kv_parallel) one of its own job past that run's last. */
static i64 run_items(uint32_t job, kv_task fn, const void *ctx, int me, int runs) {
    i64 ran = 0;
    for (int k = 0; k < runs; k++) {
        int r = (me + k) % runs;
        uint64_t c = atomic_load_explicit(&R[r].claim, memory_order_acquire);
        while ((uint32_t)(c >> 32) == job && (i64)(uint32_t)c < atomic_load(&R[r].end)) {
            if (!atomic_compare_exchange_weak(&R[r].claim, &c, c + 1)) continue;
            fn(ctx, (i64)(uint32_t)c);
            ran++;
            c = atomic_load_explicit(&R[r].claim, memory_order_acquire);
        }
    }
    if (ran) atomic_fetch_add(&P.done, ran);
    return ran;
}

/* A new job's seq (even, not `seen`): spin up to spin_ns, then sleep until the caller wakes us. */
static uint32_t next_job(uint32_t seen, i64 spin_ns) {
    i64 until = 0;
    for (int i = 0;; i++) {
        uint32_t s = atomic_load_explicit(&P.seq, memory_order_acquire);
        if (s != seen && !(s & 1)) return s;
        cpu_pause();
        if (i % 64 != 63) continue;
        i64 t = now_ns(CLOCK_MONOTONIC);
        if (!until) until = t + spin_ns;
        if (t < until) continue;
        atomic_fetch_add(&P.sleepers, 1); /* then seq: the caller stores seq, then reads this */
        s = atomic_load(&P.seq);
        if (s == seen || (s & 1)) sleep_on(&P.seq, s);
        atomic_fetch_sub(&P.sleepers, 1);
        until = 0;
    }
}

static void *worker(void *arg) {
    int id = (int)(intptr_t)arg, wanted = 1;
    uint32_t seen = 0;
    for (;;) {
        uint32_t s = seen = next_job(seen, wanted ? SPIN_NS : 0); /* not wanted: sleep at once */
        kv_task fn = atomic_load_explicit(&P.fn, memory_order_relaxed);
        const void *ctx = atomic_load_explicit(&P.ctx, memory_order_relaxed);
        int want = atomic_load_explicit(&P.want, memory_order_relaxed);
        int runs = atomic_load_explicit(&P.runs, memory_order_relaxed);
        atomic_thread_fence(memory_order_acquire);
        if (atomic_load_explicit(&P.seq, memory_order_relaxed) != s)
            continue; /* a newer job is being set up: its claim will say so */
        wanted = id <= want;
        if (wanted) atomic_fetch_add(&P.worker_items, run_items(s >> 1, fn, ctx, id, runs));
    }
    return NULL;
}

/* torch's OpenMP threads (libgomp) spin ~10 ms after each of torch's parallel regions unless
 * OMP_WAIT_POLICY or GOMP_SPINCOUNT was set before torch loaded: a decode step's few torch ops
 * then keep a thread spinning on the core a kernel thread needs. libgomp spins 1000 times only
 * (microseconds) while it manages more threads than there are CPUs (its documented rule): one
 * more OpenMP thread, parked for good, makes it so. Not done when the user chose a policy. */
static _Atomic int parked; /* the parked team's size, once it has formed */

static void *park(void *arg) {
    (void)arg;
    int team = 0; /* counted, or the compiler drops the empty region */
#pragma omp parallel num_threads(2) reduction(+ : team)
    team += 1; /* this thread and an OpenMP worker, which then waits in libgomp for good */
    atomic_store(&parked, team);
    for (;;) pause(); /* every signal is blocked here: this never returns */
    return NULL;
}

static void quiet_openmp(void) {
    static int done;
    if (done || getenv("OMP_WAIT_POLICY") || getenv("GOMP_SPINCOUNT")) return;
    done = 1;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old); /* the parked threads take no signal */
    pthread_t t;
    if (!pthread_create(&t, NULL, park, NULL)) pthread_detach(t);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

static void after_fork(void) { /* the child has none of the parent's workers */
    pthread_mutex_init(&P.owner, NULL);
    P.workers = 0;
    atomic_store(&P.sleepers, 0);
}

static void start_workers(int k) {
    static int hooked;
    if (!hooked) hooked = !pthread_atfork(NULL, NULL, after_fork);
    if (k > MAX_WORKERS) k = MAX_WORKERS;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old); /* signals go to the program's own threads */
    for (; P.workers < k; P.workers++) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int failed = pthread_create(&t, &attr, worker, (void *)(intptr_t)(P.workers + 1));
        pthread_attr_destroy(&attr);
        if (failed) break;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

/* ---------------------------------------------------------------- the other processes' load */
static struct {
    i64 t, busy, own; /* when last measured; busy ticks of our CPUs (ns); our process's CPU time */
    int limit;        /* threads worth running, from the last measurement (0: no limit) */
} L;

#ifdef __linux__
/* CPU time (ns) that anything used on the CPUs this process may run on, per /proc/stat */
static i64 cpus_busy_ns(int *ncpu) {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set)) return -1;
    FILE *f = fopen("/proc/stat", "r");
    if (!f) return -1;
    char line[512];
    long long busy = 0;
    *ncpu = 0;
    while (fgets(line, sizeof line, f)) {
        int cpu;
        long long v[8] = {0};
        if (strncmp(line, "cpu", 3) != 0) break;
        if (sscanf(line, "cpu%d %lld %lld %lld %lld %lld %lld %lld %lld", &cpu, &v[0], &v[1],
                   &v[2], &v[3], &v[4], &v[5], &v[6], &v[7]) != 9 || !CPU_ISSET(cpu, &set))
            continue; /* the "cpu" total, or a CPU we may not use */
        busy += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]; /* not idle (3) nor iowait (4) */
        (*ncpu)++;
    }
    fclose(f);
    return busy * (1000000000 / sysconf(_SC_CLK_TCK));
}
#else
static i64 cpus_busy_ns(int *ncpu) { (void)ncpu; return -1; }
#endif

/* Threads worth running now: our CPUs less those other processes kept busy since the last look
 * (half a core or more counts as one). Our own threads are not counted, so the figure does not
 * move with the choice it makes. */
static int load_limit(void) {
    i64 t = now_ns(CLOCK_MONOTONIC);
    if (L.t && t - L.t < LOAD_NS) return L.limit;
    int ncpu = 0;
    i64 busy = cpus_busy_ns(&ncpu), own = now_ns(CLOCK_PROCESS_CPUTIME_ID);
    if (busy < 0 || ncpu < 1) return L.limit = 0;
    if (L.t) {
        double others = (double)((busy - L.busy) - (own - L.own)) / (double)(t - L.t);
        int free = (int)((double)ncpu - others + 0.5);
        L.limit = free < 1 ? 1 : free;
    }
    L.t = t, L.busy = busy, L.own = own;
    return L.limit;
}

/* ---------------------------------------------------------------- the interface */
static int threads_for(i64 n) {
    int torch_threads = omp_get_max_threads();
    if (torch_threads > 1) quiet_openmp(); /* torch's regions have workers, which would spin */
    int t = P.fixed > 0 ? P.fixed : torch_threads;
    if (t > 1 && P.adapt && P.fixed <= 0) {
        int lim = load_limit();
        if (lim > 0 && lim < t) t = lim;
    }
    if (t > MAX_WORKERS + 1) t = MAX_WORKERS + 1;
    return n < t ? (int)n : t;
}

/* Run fn(ctx, i) for every i < n, on as many threads as threads_for says; returns when all ran. */
void kv_parallel(kv_task fn, const void *ctx, i64 n) {
    if (n <= 0) return;
    if (n == 1 || pthread_mutex_trylock(&P.owner) != 0) { /* a second caller runs alone */
        for (i64 i = 0; i < n; i++) fn(ctx, i);
        return;
    }
    int t = threads_for(n);
    if (t > 1) start_workers(t - 1);
    if (t <= 1 || P.workers < 1) {
        pthread_mutex_unlock(&P.owner);
        for (i64 i = 0; i < n; i++) fn(ctx, i);
        return;
    }
    uint32_t s = atomic_load(&P.seq) + 2, job = s >> 1;
    atomic_store(&P.seq, s - 1); /* odd: a worker that reads the fields now starts over */
    atomic_thread_fence(memory_order_release);
    atomic_store_explicit(&P.fn, fn, memory_order_relaxed);
    atomic_store_explicit(&P.ctx, ctx, memory_order_relaxed);
    atomic_store_explicit(&P.want, t - 1, memory_order_relaxed);
    atomic_store_explicit(&P.runs, t, memory_order_relaxed);
    atomic_store(&P.done, 0);
    /* Run r: items [r n / t, (r + 1) n / t). Its claim first, then its end: a worker still in
     * the last job's run_items (it ran nothing there, so that job could end without it) that
     * reads this end has the claim's new job number to see, so its compare-and-swap of the old
     * claim fails; the other order let it take the old job's item at the old end, past its
     * last, with the old job's ctx, and count it into this job's done. */
    for (int r = 0; r < t; r++) {
        atomic_store(&R[r].claim, (uint64_t)job << 32 | (uint64_t)(r * n / t));
        atomic_store(&R[r].end, (r + 1) * n / t);
    }
    atomic_store(&P.seq, s); /* then sleepers: a worker adds itself, then reads seq */
    if (atomic_load(&P.sleepers) > 0) wake_all(&P.seq);
    run_items(job, fn, ctx, 0, t);
    for (int i = 0; atomic_load_explicit(&P.done, memory_order_acquire) < n; i++) {
        if (i < WAIT_SPINS) cpu_pause();
        else sched_yield(); /* the item's thread may be waiting for this core */
    }
    pthread_mutex_unlock(&P.owner);
}

/* Threads the next job may use (torch's count, less what other processes keep busy). */
int kv_threads(void) {
    pthread_mutex_lock(&P.owner);
    int t = threads_for(INT_MAX);
    pthread_mutex_unlock(&P.owner);
    return t;
}

/* adapt: use fewer threads while other processes are busy (1, the default) or not (0); fixed > 0:
 * exactly that many threads, whatever torch says (0: torch's). */
void kv_set_threads(int adapt, int fixed) {
    pthread_mutex_lock(&P.owner);
    P.adapt = adapt, P.fixed = fixed;
    pthread_mutex_unlock(&P.owner);
}

i64 kv_worker_items(void) { return atomic_load(&P.worker_items); }

int kv_parked_openmp(void) { return atomic_load(&parked); }
