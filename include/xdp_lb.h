/* Shared between bpf/xdp_lb.c and src/xdp_lb.rs: the service tables of service.h with a
 * Maglev lookup ring per service, the per-flow state of a one-arm full-NAT load balancer,
 * per-CPU counters and the events it sends to user space. */
#pragma once

#include "service.h"

#define XDP_LB_MAX_SERVICES 65536
#define XDP_LB_BACKEND_SLOTS 32768
#define XDP_LB_MAX_BACKENDS_PER_SERVICE 4096
/* how far xdp_lb_compat (no bpf_loop) looks for a flow's backend in a rewritten list */
#define XDP_LB_COMPAT_SEARCH 256
/* A service whose backends sit in slots [base, base + count) owns the ring entries
 * [base * XDP_LB_RING_PER_SLOT, (base + count) * XDP_LB_RING_PER_SLOT): the first holds the
 * Maglev table size M (a prime >= 100 * count, at most 65537 < 128 * count), the next M
 * hold backend indexes relative to base. Written before the service is swapped in. */
#define XDP_LB_RING_PER_SLOT 128
#define XDP_LB_RING_ENTRIES (XDP_LB_BACKEND_SLOTS * XDP_LB_RING_PER_SLOT)
#define XDP_LB_DEFAULT_FLOWS 262144
/* Source ports tried for a new flow before giving up on it */
#define XDP_LB_PORT_PROBES 32
/* Random slots of the flow clock tried for a new flow before the table counts as full of
 * established flows (at 85% of them, 16 tries all fail 7% of the time) */
#define XDP_LB_CLOCK_TRIES 16

/* Idle time after which a flow's source port may be given to another flow. A flow that has
 * seen no reply yet (a SYN, one UDP datagram: half-open) lives 30 s, as conntrack's
 * unreplied UDP and within Cilium's CT_SYN_TIMEOUT (60 s); once older than 1 s it gives its
 * port and table slot to a new flow that needs them (its backend had a second to answer). */
#define XDP_LB_HALF_OPEN_NS (30ULL * 1000000000ULL)
#define XDP_LB_PREEMPT_NS (1ULL * 1000000000ULL)
#define XDP_LB_TCP_IDLE_NS (3600ULL * 1000000000ULL)
#define XDP_LB_TCP_CLOSED_NS (10ULL * 1000000000ULL) /* FIN both ways (conntrack's CLOSE) */
#define XDP_LB_TCP_RESET_NS (2ULL * 1000000000ULL)   /* RST: no side keeps the port */
#define XDP_LB_UDP_IDLE_NS (120ULL * 1000000000ULL)

/* Flood detector (include/flood.h): above this many new flows per second per CPU, a new flow
 * is only made for a client that asks again. Full NAT cannot balance statelessly (the reply
 * needs the flow), so the first packet is dropped. */
#define XDP_LB_DEFAULT_FLOOD_RATE 40000

/* One direction of a flow as it arrives: client -> VIP (the flow table's key), or
 * backend -> this node (the reverse table's key); the IPv4 tables take it as a struct
 * xdp_lb_tuple4. 8-byte aligned: xdp_lb.c writes the packet's tuple in 8-byte stores
 * (tuple_of). */
struct __attribute__((aligned(8))) xdp_lb_tuple {
	__u32 src[4];
	__u32 dst[4];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 family;
	__u16 pad;
};

/* An IPv4 tuple as the IPv4 flow and reverse tables' key (xdp_lb_flows4, xdp_lb_reverse4):
 * 16 bytes, where struct xdp_lb_tuple takes 40 for IPv6's addresses. 8-byte aligned: xdp_lb.c
 * writes it in 8-byte stores (key4_of). */
struct __attribute__((aligned(8))) xdp_lb_tuple4 {
	__be32 src;
	__be32 dst;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
};

/* The reverse table's value: what a backend's reply needs to reach its client without a
 * look at the flow table. Written with its flow, removed with it. */
struct xdp_lb_reply {
	struct xdp_lb_tuple client; /* the flow's key, client -> VIP; first: readers see a tuple */
	__u64 last_seen;	    /* ns of the backend's latest packet (the flow's: the client's) */
	__u32 slot;		    /* the flow's backend slot, for its counters */
	__u8 client_mac[6];	    /* the flow's */
	__u8 state;		    /* XDP_LB_REPLIED once the flow knows the backend answered */
	__u8 pad;
};

struct xdp_lb_backend {
	struct service_endpoint endpoint; /* first: service.h readers see an endpoint */
	__u32 lb_addr[4];		  /* this node's address towards the backend */
	__u8 mac[6];			  /* next hop towards the backend on the interface */
	__u8 pad[2];
};

/* flow state bits */
#define XDP_LB_FIN_CLIENT 0x01
#define XDP_LB_FIN_BACKEND 0x02
#define XDP_LB_RST 0x04
#define XDP_LB_REPLIED 0x08 /* the backend answered */
/* then the client (a TCP ACK, another datagram): never evicted for new flows; before, the
 * flow is half-open (a backend answers spoofed SYNs too, with SYN cookies) */
#define XDP_LB_ESTABLISHED 0x10

/* A flow: client -> VIP becomes this node:lb_port -> backend. */
struct xdp_lb_flow {
	struct service_endpoint backend;
	__u32 lb_addr[4];
	__u64 last_seen; /* ns of the client's latest packet (the backend's: in its xdp_lb_reply) */
	__u32 slot;	 /* backend slot for counters; checked against the backend each packet */
	__be16 lb_port;
	__u8 client_mac[6]; /* where replies go: the client or the router it came through */
	__u8 state;
	__u8 pad[3];
	__u32 clock_slot; /* its slot in the flow clock, which names it back */
	/* services_epoch's value when its service and backend were last checked: while it is
	 * still the one, a packet skips the service lookup (0, of older runs: never checked) */
	__u32 epoch;
};


/* Per backend slot, per CPU. */
struct xdp_lb_stats {
	__u64 packets_in; /* client -> backend */
	__u64 bytes_in;
	__u64 packets_out; /* backend -> client */
	__u64 bytes_out;
	__u64 new_flows;
};

/* Per CPU, key 0: events off the fast path (packets and bytes are per backend). */
struct xdp_lb_counters {
	__u64 new_flows;
	__u64 rerouted;	      /* a flow whose backend left its service, sent to a new one */
	__u64 no_port;	      /* no free source port towards the backend: packet dropped */
	__u64 flow_failed;    /* flow table insert failed: packet dropped */
	__u64 stale_replies;  /* a reply whose flow was evicted or moved: passed to the kernel */
	__u64 lost_events;    /* ring buffer full: event not sent (the packet went on) */
	__u64 unattributed;   /* reply counted nowhere: its backend slot changed meanwhile */
	__u64 evicted;	      /* half-open or finished flows that made room for a new flow */
	__u64 port_retries;   /* source ports probed beyond the first: rising means ports run low */
	__u64 flood_dropped;  /* first packet of a new flow dropped while under flood */
	__u64 flood_admitted; /* new flows made under flood for a client that asked again */
	__u64 table_full;     /* no room: every slot tried held a live established flow; dropped */
	__u64 icmp_to_client;  /* ICMP error about a flow's backend leg, sent on to its client */
	__u64 icmp_to_backend; /* ICMP error about a flow's client leg, sent on to its backend */
	__u64 refused;	       /* new flows to a service without a usable backend: RST / ICMP unreachable */
};

#define XDP_LB_EVENT_NEW_FLOW 1
#define XDP_LB_EVENT_REROUTED 2
#define XDP_LB_EVENT_TRACE_IN 3
#define XDP_LB_EVENT_TRACE_OUT 4

/* events_level (rodata) */
#define XDP_LB_EVENTS_OFF 0
#define XDP_LB_EVENTS_FLOWS 1
#define XDP_LB_EVENTS_TRACE 2

struct xdp_lb_event {
	__u64 timestamp; /* bpf_ktime_get_ns */
	struct xdp_lb_tuple flow; /* client -> VIP */
	struct service_endpoint backend;
	struct service_endpoint previous; /* rerouted: the backend that left */
	__u32 len;			  /* trace: frame length */
	__be16 lb_port;
	__u8 kind;
	__u8 pad;
};

/* xdp_lb.c's rewrite_packet reads the next hop's MAC as a 4-byte and a 2-byte word (not six
 * single bytes, every packet): these two fields must stay 4-byte aligned in their values. */
_Static_assert(__builtin_offsetof(struct xdp_lb_reply, client_mac) % 4 == 0, "xdp_lb_reply.client_mac aligned");
_Static_assert(__builtin_offsetof(struct xdp_lb_backend, mac) % 4 == 0, "xdp_lb_backend.mac aligned");
