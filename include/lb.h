/* Shared between bpf/lb.c and src/lb.rs: the service tables of service.h with backends that
 * carry their source NAT address, per-backend new-flow counts and per-CPU event counters. */
#pragma once

#include "service.h"

#define LB_MAX_SERVICES 65536
#define LB_BACKEND_SLOTS 131072
#define LB_MAX_BACKENDS_PER_SERVICE 16384

/* Initial conntrack timeouts of an entry the program creates (the kernel's defaults for a
 * TCP SYN_SENT and an unreplied UDP flow); conntrack's state machine takes over with the
 * first packet it sees, which is the one that created the entry. */
#define LB_TCP_NEW_TIMEOUT_MS 120000
#define LB_UDP_NEW_TIMEOUT_MS 30000

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
	__u64 alloc_failed;  /* bpf_skb_ct_alloc returned nothing (table full, bad tuple) */
	__u64 nat_failed;    /* bpf_ct_set_nat_info failed; entry inserted with a 1 ms life */
	__u64 insert_failed; /* lost a race with another CPU inserting the same flow */
};
