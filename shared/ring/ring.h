/*
 * pcisplit shared-memory ring: the one declaration of the layout and the
 * lock-free producer/consumer helpers. Compiled through cffi (API mode) by
 * shared/ring/_build.py; a C peer may #include this file as it is.
 *
 * One ring carries one direction. It is a byte area whose size is a power of
 * two, indexed by free-running u32 byte offsets (prod, cons). A record is a
 * u32 little-endian payload length followed by the payload, padded to 8
 * bytes. Records may wrap around the end of the area: the copy is split in
 * two (no wrap marker, no wasted space). The 4-byte length never straddles
 * the end because every record starts 8-aligned.
 *
 * Notification suppression uses event indices, as Xen's io/ring.h does: the
 * consumer publishes prod_event ("ring my doorbell when prod passes this") and
 * the producer publishes cons_event ("ring mine when cons passes this"); a
 * side notifies only when its new index crosses the peer's event index.
 *
 * The peer is hostile: it can write any shared byte at any time. Every peer
 * index is loaded once per operation into a private variable and validated;
 * a record length is loaded once, validated, and the payload copied once into
 * private memory (XSA-155). Geometry (size, mask, max_record) lives only in
 * the private struct pcisplit_ring, never re-read from shared memory.
 *
 * The text between the CDEF markers is also fed to cffi's cdef(), so it must
 * stay in the subset cffi parses (plain structs, enums, prototypes).
 */
#ifndef PCISPLIT_RING_H
#define PCISPLIT_RING_H

#include <stdint.h>
#include <string.h>
#include <time.h>

/* BEGIN CDEF */
enum pcisplit_ring_consts {
    PCISPLIT_SHM_MAGIC = 0x4d485350,        /* "PSHM" read as a little-endian u32 */
    PCISPLIT_SHM_VERSION = 1,
    PCISPLIT_SHM_DATA_OFFSET = 4096,        /* first data area, page aligned */
    PCISPLIT_RING_MIN_SIZE = 4096,
    PCISPLIT_RING_MAX_SIZE = 1073741824,    /* 2**30: keeps u32 index arithmetic exact */
    PCISPLIT_RING_ALIGN = 8,
    PCISPLIT_RING_RECORD_HEADER = 4
};

enum pcisplit_ring_status {
    PCISPLIT_RING_OK = 0,
    PCISPLIT_RING_EMPTY = -1,               /* consumer: nothing published */
    PCISPLIT_RING_FULL = -2,                /* producer: not enough free space */
    PCISPLIT_RING_E_PROD_AHEAD = -10,       /* peer prod more than the ring size ahead */
    PCISPLIT_RING_E_PROD_BACKWARDS = -11,   /* peer prod moved backwards */
    PCISPLIT_RING_E_MISALIGNED = -12,       /* peer index not a multiple of 8 */
    PCISPLIT_RING_E_RECORD_TOO_LARGE = -13, /* record length over max_record */
    PCISPLIT_RING_E_RECORD_PAST_END = -14,  /* record runs past the published prod */
    PCISPLIT_RING_E_CONS_INVALID = -15,     /* peer cons backwards or past our prod */
    PCISPLIT_RING_E_NOT_EMPTY = -16,        /* attach: ring was not empty */
    PCISPLIT_RING_E_LOCAL_TOO_LARGE = -17,  /* our own frame is over max_record */
    PCISPLIT_RING_E_RELEASED = -18          /* this endpoint let go of the memory */
};

/* One direction's indices, in shared memory. Producer-written and
 * consumer-written fields sit on separate 64-byte cache lines. */
struct pcisplit_ring_ctrl {
    uint32_t prod;             /* written by the producer */
    uint32_t cons_event;       /* written by the producer: wake me when cons passes it */
    uint8_t pad_producer[56];
    uint32_t cons;             /* written by the consumer */
    uint32_t prod_event;       /* written by the consumer: wake me when prod passes it */
    uint8_t pad_consumer[56];
};

/* Start of the shared region (memfd). Ring 0 carries client->server,
 * ring 1 server->client. Data areas follow at PCISPLIT_SHM_DATA_OFFSET:
 * ring 0 first, ring 1 right after it. Informational for C peers and
 * debugging: each side uses its own validated copy of the geometry. */
struct pcisplit_shm_header {
    uint32_t magic;
    uint32_t version;
    uint32_t ring_size[2];
    uint32_t max_record;
    uint32_t reserved[11];
    struct pcisplit_ring_ctrl ring[2];
};

/* One endpoint's private view of one ring. Lives in private memory only. */
struct pcisplit_ring {
    struct pcisplit_ring_ctrl *ctrl;
    uint8_t *data;
    uint32_t size;
    uint32_t mask;
    uint32_t max_record;
    uint32_t prod_pvt;     /* producer: next write index; consumer: last validated prod */
    uint32_t cons_pvt;     /* consumer: next read index; producer: last validated cons */
    uint32_t published;    /* producer: last prod made visible to the peer */
    int32_t broken;        /* sticky status once the peer corrupted the ring */
    uint32_t bad_value;    /* the offending value, for the error message */
    uint32_t bad_limit;    /* the bound it broke */
};

uint32_t pcisplit_ring_record_size(uint32_t len);
int pcisplit_need_notify(uint32_t event, uint32_t new_idx, uint32_t old_idx);
void pcisplit_ring_reset(struct pcisplit_ring_ctrl *ctrl, uint32_t initial);
int pcisplit_ring_attach(struct pcisplit_ring *r, struct pcisplit_ring_ctrl *ctrl,
                         uint8_t *data, uint32_t size, uint32_t max_record, int consumer);

int pcisplit_ring_write(struct pcisplit_ring *r, const char *buf, uint32_t len);
int pcisplit_ring_publish(struct pcisplit_ring *r);
int pcisplit_ring_send(struct pcisplit_ring *r, const char *buf, uint32_t len);
int64_t pcisplit_ring_free_space(struct pcisplit_ring *r);
int pcisplit_ring_prepare_wait_space(struct pcisplit_ring *r, uint32_t len);

int64_t pcisplit_ring_read(struct pcisplit_ring *r, char *out, uint32_t cap);
int pcisplit_ring_prepare_wait(struct pcisplit_ring *r);
int pcisplit_ring_spin(struct pcisplit_ring *r, uint64_t budget_ns);
void pcisplit_ring_release(struct pcisplit_ring *r);
/* END CDEF */

#ifndef PCISPLIT_RING_DECLARATIONS_ONLY

_Static_assert(sizeof(struct pcisplit_ring_ctrl) == 128, "ring ctrl must be two cache lines");
_Static_assert(sizeof(struct pcisplit_shm_header) == 320, "shm header layout changed");
_Static_assert(sizeof(struct pcisplit_shm_header) <= PCISPLIT_SHM_DATA_OFFSET,
               "header overlaps the data area");

#define PCISPLIT_LOAD_ACQ(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define PCISPLIT_LOAD_ONCE(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define PCISPLIT_STORE_REL(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define PCISPLIT_FULL_FENCE() __atomic_thread_fence(__ATOMIC_SEQ_CST)

static inline void pcisplit_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#endif
}

uint32_t pcisplit_ring_record_size(uint32_t len)
{
    /* Callers bound len by max_record (< 2**30), so this cannot overflow. */
    return (PCISPLIT_RING_RECORD_HEADER + len + (PCISPLIT_RING_ALIGN - 1)) &
           ~(uint32_t)(PCISPLIT_RING_ALIGN - 1);
}

/* Xen's rule: notify iff the peer's event index lies in (old, new]. */
int pcisplit_need_notify(uint32_t event, uint32_t new_idx, uint32_t old_idx)
{
    return (uint32_t)(new_idx - event) < (uint32_t)(new_idx - old_idx);
}

void pcisplit_ring_reset(struct pcisplit_ring_ctrl *ctrl, uint32_t initial)
{
    /* prod_event starts at initial+1 so the first record always notifies, as in
     * Xen. cons_event starts outside any future (old, new] window until the
     * producer asks for space, so consuming never rings a doorbell unasked. */
    PCISPLIT_STORE_REL(&ctrl->prod_event, initial + 1);
    PCISPLIT_STORE_REL(&ctrl->cons_event, initial);
    PCISPLIT_STORE_REL(&ctrl->cons, initial);
    PCISPLIT_STORE_REL(&ctrl->prod, initial);
    PCISPLIT_FULL_FENCE();
}

static int pcisplit_fail(struct pcisplit_ring *r, int code, uint32_t value, uint32_t limit)
{
    r->broken = code;
    r->bad_value = value;
    r->bad_limit = limit;
    return code;
}

int pcisplit_ring_attach(struct pcisplit_ring *r, struct pcisplit_ring_ctrl *ctrl,
                         uint8_t *data, uint32_t size, uint32_t max_record, int consumer)
{
    uint32_t prod = PCISPLIT_LOAD_ACQ(&ctrl->prod);
    uint32_t cons = PCISPLIT_LOAD_ACQ(&ctrl->cons);
    memset(r, 0, sizeof(*r));
    r->ctrl = ctrl;
    r->data = data;
    r->size = size;
    r->mask = size - 1;
    r->max_record = max_record;
    if ((prod | cons) & (PCISPLIT_RING_ALIGN - 1))
        return pcisplit_fail(r, PCISPLIT_RING_E_MISALIGNED, (prod & 7) ? prod : cons, 8);
    /* A session starts on an empty ring; anything else is a peer that wrote early. */
    if (prod != cons)
        return pcisplit_fail(r, PCISPLIT_RING_E_NOT_EMPTY, prod, cons);
    (void)consumer;
    r->prod_pvt = prod;
    r->cons_pvt = cons;
    r->published = prod;
    return PCISPLIT_RING_OK;
}

/* After this every call returns PCISPLIT_RING_E_RELEASED without touching the
 * (possibly unmapped) shared memory. */
void pcisplit_ring_release(struct pcisplit_ring *r)
{
    r->broken = PCISPLIT_RING_E_RELEASED;
    r->ctrl = NULL;
    r->data = NULL;
}

/* ------------------------------------------------------------- producer */

/* Load the consumer's index once and check it lies in [last seen, published]. */
static int pcisplit_refresh_cons(struct pcisplit_ring *r)
{
    uint32_t cons = PCISPLIT_LOAD_ACQ(&r->ctrl->cons);
    if (cons & (PCISPLIT_RING_ALIGN - 1))
        return pcisplit_fail(r, PCISPLIT_RING_E_MISALIGNED, cons, 8);
    if ((uint32_t)(cons - r->cons_pvt) > (uint32_t)(r->published - r->cons_pvt))
        return pcisplit_fail(r, PCISPLIT_RING_E_CONS_INVALID, cons, r->published);
    r->cons_pvt = cons;
    return PCISPLIT_RING_OK;
}

int64_t pcisplit_ring_free_space(struct pcisplit_ring *r)
{
    int rc;
    if (r->broken)
        return r->broken;
    rc = pcisplit_refresh_cons(r);
    if (rc)
        return rc;
    return (int64_t)r->size - (int64_t)(uint32_t)(r->prod_pvt - r->cons_pvt);
}

/* Copy one record in at prod_pvt without publishing it. */
int pcisplit_ring_write(struct pcisplit_ring *r, const char *buf, uint32_t len)
{
    uint32_t need, used, start, first;
    uint8_t *data = r->data;
    if (r->broken)
        return r->broken;
    if (len > r->max_record)
        return PCISPLIT_RING_E_LOCAL_TOO_LARGE;
    need = pcisplit_ring_record_size(len);
    used = r->prod_pvt - r->cons_pvt;
    if (r->size - used < need) {
        int rc = pcisplit_refresh_cons(r);
        if (rc)
            return rc;
        used = r->prod_pvt - r->cons_pvt;
        if (r->size - used < need)
            return PCISPLIT_RING_FULL;
    }
    start = r->prod_pvt & r->mask;
    memcpy(data + start, &len, PCISPLIT_RING_RECORD_HEADER);
    start = (start + PCISPLIT_RING_RECORD_HEADER) & r->mask;
    first = r->size - start;
    if (first >= len) {
        memcpy(data + start, buf, len);
    } else {
        memcpy(data + start, buf, first);
        memcpy(data, buf + first, len - first);
    }
    r->prod_pvt += need;
    return PCISPLIT_RING_OK;
}

/* Make every written record visible; returns 1 when the consumer asked for a doorbell. */
int pcisplit_ring_publish(struct pcisplit_ring *r)
{
    uint32_t old = r->published, new_idx = r->prod_pvt, event;
    if (r->broken)
        return r->broken;
    if (old == new_idx)
        return 0;
    PCISPLIT_STORE_REL(&r->ctrl->prod, new_idx);
    r->published = new_idx;
    /* Publish before reading the event index (Dekker with prepare_wait). */
    PCISPLIT_FULL_FENCE();
    event = PCISPLIT_LOAD_ONCE(&r->ctrl->prod_event);
    return pcisplit_need_notify(event, new_idx, old);
}

int pcisplit_ring_send(struct pcisplit_ring *r, const char *buf, uint32_t len)
{
    int rc = pcisplit_ring_write(r, buf, len);
    if (rc)
        return rc;
    return pcisplit_ring_publish(r);
}

/* Producer's final check before sleeping for space: 1 = space now, 0 = sleep. */
int pcisplit_ring_prepare_wait_space(struct pcisplit_ring *r, uint32_t len)
{
    uint32_t need, target;
    int rc;
    if (r->broken)
        return r->broken;
    if (len > r->max_record)
        return PCISPLIT_RING_E_LOCAL_TOO_LARGE;
    need = pcisplit_ring_record_size(len);
    /* Enough space exists once cons reaches prod_pvt + need - size. */
    target = r->prod_pvt + need - r->size;
    PCISPLIT_STORE_REL(&r->ctrl->cons_event, target);
    PCISPLIT_FULL_FENCE();
    rc = pcisplit_refresh_cons(r);
    if (rc)
        return rc;
    return r->size - (uint32_t)(r->prod_pvt - r->cons_pvt) >= need;
}

/* ------------------------------------------------------------- consumer */

/* Load the producer's index once and check it lies in [last seen, cons + size]. */
static int pcisplit_refresh_prod(struct pcisplit_ring *r)
{
    uint32_t prod = PCISPLIT_LOAD_ACQ(&r->ctrl->prod);
    uint32_t forward = prod - r->prod_pvt;
    uint32_t room = r->size - (uint32_t)(r->prod_pvt - r->cons_pvt);
    if (prod & (PCISPLIT_RING_ALIGN - 1))
        return pcisplit_fail(r, PCISPLIT_RING_E_MISALIGNED, prod, 8);
    if (forward > room) {
        /* Invalid either way; name it "backwards" when it went back by at most a ring. */
        if ((uint32_t)(r->prod_pvt - prod) <= r->size)
            return pcisplit_fail(r, PCISPLIT_RING_E_PROD_BACKWARDS, prod, r->prod_pvt);
        return pcisplit_fail(r, PCISPLIT_RING_E_PROD_AHEAD, prod, r->cons_pvt);
    }
    r->prod_pvt = prod;
    return PCISPLIT_RING_OK;
}

/* Copy the next record into out (private memory). Returns its length, with
 * bit 32 set when the producer asked for a doorbell; or a negative status. */
int64_t pcisplit_ring_read(struct pcisplit_ring *r, char *out, uint32_t cap)
{
    uint32_t avail, len, need, start, first, old, new_idx, event;
    const uint8_t *data = r->data;
    int notify;
    if (r->broken)
        return r->broken;
    if (r->prod_pvt == r->cons_pvt) {
        int rc = pcisplit_refresh_prod(r);
        if (rc)
            return rc;
        if (r->prod_pvt == r->cons_pvt)
            return PCISPLIT_RING_EMPTY;
    }
    avail = r->prod_pvt - r->cons_pvt;
    start = r->cons_pvt & r->mask;
    /* The one fetch of the length: everything below uses this private copy. */
    len = PCISPLIT_LOAD_ONCE((const uint32_t *)(data + start));
    if (len > r->max_record || len > cap)
        return pcisplit_fail(r, PCISPLIT_RING_E_RECORD_TOO_LARGE, len,
                             r->max_record < cap ? r->max_record : cap);
    need = pcisplit_ring_record_size(len);
    if (need > avail)
        return pcisplit_fail(r, PCISPLIT_RING_E_RECORD_PAST_END, len, avail);
    start = (start + PCISPLIT_RING_RECORD_HEADER) & r->mask;
    first = r->size - start;
    if (first >= len) {
        memcpy(out, data + start, len);
    } else {
        memcpy(out, data + start, first);
        memcpy(out + first, data, len - first);
    }
    old = r->cons_pvt;
    new_idx = old + need;
    r->cons_pvt = new_idx;
    /* Release: our copy-out completes before the producer may reuse the space. */
    PCISPLIT_STORE_REL(&r->ctrl->cons, new_idx);
    PCISPLIT_FULL_FENCE();
    event = PCISPLIT_LOAD_ONCE(&r->ctrl->cons_event);
    notify = pcisplit_need_notify(event, new_idx, old);
    return (int64_t)len | ((int64_t)notify << 32);
}

/* Consumer's final check before sleeping: 1 = data now, 0 = safe to sleep. */
int pcisplit_ring_prepare_wait(struct pcisplit_ring *r)
{
    int rc;
    if (r->broken)
        return r->broken;
    if (r->prod_pvt != r->cons_pvt)
        return 1;
    PCISPLIT_STORE_REL(&r->ctrl->prod_event, r->cons_pvt + 1);
    /* The event store must be visible before we re-read prod (Dekker with publish). */
    PCISPLIT_FULL_FENCE();
    rc = pcisplit_refresh_prod(r);
    if (rc)
        return rc;
    return r->prod_pvt != r->cons_pvt;
}

static uint64_t pcisplit_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Adaptive polling: watch prod for up to budget_ns. 1 = data, 0 = budget spent.
 * Only detects: the next read() loads and validates prod itself. */
int pcisplit_ring_spin(struct pcisplit_ring *r, uint64_t budget_ns)
{
    uint64_t deadline;
    unsigned int i;
    if (r->broken)
        return r->broken;
    if (r->prod_pvt != r->cons_pvt)
        return 1;
    deadline = pcisplit_now_ns() + budget_ns;
    for (;;) {
        for (i = 0; i < 64; i++) {
            if (PCISPLIT_LOAD_ONCE(&r->ctrl->prod) != r->cons_pvt)
                return 1;
            pcisplit_cpu_relax();
        }
        if (pcisplit_now_ns() >= deadline)
            return 0;
    }
}

#endif /* PCISPLIT_RING_DECLARATIONS_ONLY */
#endif /* PCISPLIT_RING_H */
