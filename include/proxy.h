/* Shared between bpf/proxy.c and src/proxy.rs: rules, per-flow reverse entries, counters.
 * Addresses and ports are in network order, as on the wire; IPv4 uses addr[0]. */
#pragma once

#include "csum.h"
#include "icmp_error.h"

#define PROXY_MAX_RULES 4096
#define PROXY_MAX_FLOWS 65536

/* An address and port of one family; pad zeroed so equal endpoints hash equal. */
struct proxy_endpoint {
	__u32 addr[4];
	__be16 port;
	__u8 family; /* AF_INET (2) or AF_INET6 (10) */
	__u8 pad;
};

/* Where a rule sends packets addressed to its FROM endpoint (the key). */
struct proxy_target {
	struct proxy_endpoint to;
	__u32 rule_id; /* index into proxy_stats */
};

/* A reply as it arrives: from TO back to the client. */
struct proxy_flow_key {
	__u32 saddr[4]; /* TO */
	__u32 daddr[4]; /* the client */
	__be16 sport;   /* TO's port */
	__be16 dport;   /* the client's port */
	__u8 family;
	__u8 proto;
	__u16 pad;
};

/* What a reply must look like to the client: coming from FROM. */
struct proxy_flow {
	struct proxy_endpoint from;
	__u32 rule_id;
};

struct proxy_stats {
	__u64 packets; /* client -> FROM packets sent to TO */
	__u64 bytes;
	__u64 replies; /* TO -> client packets made to come from FROM */
	__u64 reply_bytes;
	__u64 rerouted; /* packets whose next hop changed with the destination */
	__u64 icmp_errors; /* ICMP errors about this rule's flows, made to name FROM instead of TO */
};
