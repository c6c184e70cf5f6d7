/* Shared between bpf/lb.c and src/lb.rs: the service tables of service.h with backends that
 * carry their source NAT address, per-backend new-flow counts and per-CPU event counters. */
#pragma once

#include "service.h"

#define LB_MAX_SERVICES 65536
#define LB_BACKEND_SLOTS 131072
#define LB_MAX_BACKENDS_PER_SERVICE 16384

/* Initial conntrack timeouts of an entry the program creates: TCP 60 s (conntrack's SYN_RECV,
 * Cilium's CT_SYN_TIMEOUT), UDP the kernel's 30 s for an unreplied flow. Measured on 6.18:
 * the SYN passing conntrack's hook right after resets a TCP entry to the state's own timeout
 * (SYN_SENT: 120 s by default), hence also the namespace's SYN_SENT timeout while lb runs
 * (LB_HALF_OPEN_S below). */
#define LB_TCP_NEW_TIMEOUT_MS 60000
#define LB_UDP_NEW_TIMEOUT_MS 30000
/* The timeouts conntrack gives a UDP flow that has seen a reply (nf_conntrack_udp_timeout) and
 * one that went on replying past two seconds (nf_conntrack_udp_timeout_stream), the kernel's
 * defaults since 6.0 (the stream one was 180 s before); user space reads the namespace's own
 * at start. lb refreshes them, as conntrack would, on the datagrams it sends on itself. */
#define LB_UDP_TIMEOUT_MS 30000
#define LB_UDP_STREAM_TIMEOUT_MS 120000
/* include/flood.h: new flows per second per CPU above which only clients asking again get one */
#define LB_DEFAULT_FLOOD_RATE 40000
/*
 * Source-NAT port pressure, whatever the rate of new flows: conntrack's SYN_SENT timeout
 * (which the first SYN resets the entry to, whatever bpf_ct_set_timeout said) is lowered to
 * LB_HALF_OPEN_S in the namespace while lb runs, so an entry lb made holds its port at most
 * about that long unless its flow got going. Entries made towards a backend in the last
 * window and the one before (weighted by how much of it is still within reach) estimate the
 * ports they hold; above half of the port space (1024-65535) a new flow only gets an entry
 * when its client sends its first packet again (include/flood.h), so spoofed one-shot SYNs
 * cannot take the rest and legitimate clients keep room.
 */
#define LB_HALF_OPEN_S 60
#define LB_PORT_WINDOW_NS (LB_HALF_OPEN_S * 1000000000ULL)
#define LB_PORT_BUDGET 32256

/* Per backend slot, updated by every CPU (counts are estimates: a window roll may race). */
struct lb_port_use {
	__u64 window;	/* start of the current window, ns / LB_PORT_WINDOW_NS */
	__u32 current;	/* entries made in it */
	__u32 previous; /* entries made in the window before */
};

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
	__u64 ports_low_dropped;  /* first packet of a new flow dropped: source ports of its backend low */
	__u64 ports_low_admitted; /* new flows made with ports low for a client that asked again */
	__u64 refused; /* new flows to a service without a usable backend: RST / ICMP unreachable */
	__u64 forwarded; /* datagrams of UDP flows answered both ways, translated and sent on here */
	__u64 tcp_forwarded; /* segments of established TCP flows translated and sent on here */
	__u64 tcp_tracked;   /* segments of established TCP flows conntrack still checks: passed on */
	__u64 asked;	     /* of those, the ones that asked user space to hand the flow to lb */
	__u64 asks_lost;     /* asks the ring buffer had no room for */
};

/* A segment of one in LB_ASK_EVERY of established flows' segments that conntrack still
 * checks asks user space to hand its flow to lb (a power of two): a long flow asks within
 * its first few dozen segments, a short one seldom or never. */
#define LB_ASK_EVERY 16

/* The ask: the flow's original tuple (client -> VIP), as conntrack keys it. */
struct lb_ask {
	__u32 saddr[4];
	__u32 daddr[4];
	__be16 sport;
	__be16 dport;
	__u8 family;
	__u8 proto;
	__u8 pad[2];
};

/* conntrack's default established TCP timeout (5 days), for a namespace where user space
 * cannot read it */
#define LB_TCP_ESTABLISHED_TIMEOUT_MS (432000U * 1000U)
