/* Shared between bpf/lb.c and src/lb.rs: the service tables of service.h with backends that
 * carry their source NAT address, per-backend new-flow counts and per-CPU event counters. */
#pragma once

#include "service.h"

#define LB_MAX_SERVICES 65536
#define LB_BACKEND_SLOTS 131072
#define LB_MAX_BACKENDS_PER_SERVICE 16384

/* Initial conntrack timeouts of an entry the program creates: a half-open TCP flow gets 60 s
 * (conntrack's SYN_RECV, Cilium's CT_SYN_TIMEOUT: a client's SYN retries span 63 s, and a
 * retry after the entry is gone simply gets a new one), not SYN_SENT's 120 s; UDP the
 * kernel's 30 s for an unreplied flow. Conntrack's state machine runs the entry from the
 * first packet it sees, which is the one that created it. */
#define LB_TCP_NEW_TIMEOUT_MS 60000
#define LB_UDP_NEW_TIMEOUT_MS 30000
/* include/flood.h: new flows per second per CPU above which only clients asking again get one */
#define LB_DEFAULT_FLOOD_RATE 40000

struct lb_backend {
	struct service_endpoint endpoint; /* first: service.h readers see an endpoint */
	__u32 snat_addr[4];		  /* source towards the backend; all zero: keep the client's */
};

/* Per backend slot; updated atomically (once per new flow, not per packet). */
struct lb_stats {
	__u64 new_flows;
};

/* Per CPU, key 0. */
struct lb_counters {
	__u64 new_flows;     /* conntrack entries created */
	__u64 known_flows;   /* a flow opener conntrack already knew: SYN retransmit, later UDP */
	__u64 reopened;      /* a SYN on the entry of a closed connection, replaced by a new one */
	__u64 alloc_failed;  /* bpf_skb_ct_alloc returned nothing (table full, bad tuple): dropped */
	__u64 nat_failed;    /* bpf_ct_set_nat_info failed; entry inserted with a 1 ms life: dropped */
	__u64 insert_failed; /* no entry (source NAT ports towards the backend all taken): dropped */
	__u64 insert_raced;  /* another CPU inserted the same flow first: passed on to it */
	__u64 flood_dropped; /* first packet of a new flow dropped while under flood */
	__u64 flood_admitted; /* new flows made under flood for a client that asked again */
};
