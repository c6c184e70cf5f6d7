// SPDX-License-Identifier: GPL-2.0
/* lb: an L4 load balancer on the kernel's conntrack. The first packet of a flow to a service
 * VIP:PORT gets a conntrack entry made here, with destination NAT to a backend chosen by a
 * hash of the flow and, by default, source NAT to this node's address towards that backend;
 * from then on conntrack and NAT translate the flow, both ways, but for the client's packets
 * of an answered UDP flow and of an established TCP flow conntrack has let go of
 * (answered_translation, offloaded_translation), which lb translates and sends on itself. */
#include "common.h"
#include "parse.h"
#include "hash.h"
#include "flood.h"
#include "lb.h"
#include "reject.h"
#include "csum.h"
#include "inet_csum.h"

#define BPF_F_CURRENT_NETNS (-1)
/* opts__sz the conntrack kfuncs accept on every kernel that has them (6.1+) */
#define CT_OPTS_SZ 12
#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10
/* include/uapi/linux/netfilter/nf_conntrack_tcp.h */
#define IP_CT_TCP_FLAG_BE_LIBERAL 0x08

struct nf_conn___init *bpf_skb_ct_alloc(struct __sk_buff *skb, struct bpf_sock_tuple *tuple, __u32 tuple__sz,
					struct bpf_ct_opts *opts, __u32 opts__sz) __ksym;
struct nf_conn *bpf_skb_ct_lookup(struct __sk_buff *skb, struct bpf_sock_tuple *tuple, __u32 tuple__sz,
				  struct bpf_ct_opts *opts, __u32 opts__sz) __ksym;
struct nf_conn *bpf_ct_insert_entry(struct nf_conn___init *nfct) __ksym;
void bpf_ct_release(struct nf_conn *nfct) __ksym;
void bpf_ct_set_timeout(struct nf_conn___init *nfct, __u32 timeout) __ksym;
int bpf_ct_change_timeout(struct nf_conn *nfct, __u32 timeout) __ksym;
int bpf_ct_set_nat_info(struct nf_conn___init *nfct, union nf_inet_addr *addr, int port,
			enum nf_nat_manip_type manip) __ksym;

/* Set by user space before load: seeds the flow hash. */
volatile const __u32 hash_seed = 0;
/* new flows per second per CPU that mean a flood (include/flood.h); 0: never */
volatile const __u32 flood_rate = LB_DEFAULT_FLOOD_RATE;
/* the namespace's conntrack UDP timeouts (include/lb.h), read by user space at start */
volatile const __u32 udp_timeout_ms = LB_UDP_TIMEOUT_MS;
volatile const __u32 udp_stream_timeout_ms = LB_UDP_STREAM_TIMEOUT_MS;
/* and its established TCP timeout */
volatile const __u32 tcp_established_timeout_ms = LB_TCP_ESTABLISHED_TIMEOUT_MS;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, LB_MAX_SERVICES);
	__type(key, struct service_endpoint);
	__type(value, struct service_range);
} lb_services SEC(".maps");

/* slot -> backend. The slot arrays are mmapable: user space reads and writes 100,000 slots
 * as memory rather than by system calls. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, LB_BACKEND_SLOTS);
	__type(key, __u32);
	__type(value, struct lb_backend);
} lb_backends SEC(".maps");

/* slot -> cumulative weight of the service's usable backends (include/service.h) */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, LB_BACKEND_SLOTS);
	__type(key, __u32);
	__type(value, __u32);
} lb_weights SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, LB_BACKEND_SLOTS);
	__type(key, __u32);
	__type(value, struct lb_stats);
} lb_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct lb_counters);
} lb_counters SEC(".maps");

/* the flood detector's one-second window, per CPU */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct flood_window);
} lb_flood SEC(".maps");

/* under flood: first packets dropped, by flow hash (include/flood.h) */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, FLOOD_SEEN_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} lb_flood_seen SEC(".maps");

/* session affinity: (service, client address) -> the backend it got (include/service.h) */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, AFFINITY_MAX_ENTRIES);
	__type(key, struct affinity_key);
	__type(value, struct affinity_value);
} lb_affinity SEC(".maps");

/* entries made per backend slot lately: source-NAT port pressure (include/lb.h) */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, LB_BACKEND_SLOTS);
	__type(key, __u32);
	__type(value, struct lb_port_use);
} lb_port_use SEC(".maps");

/* A UDP flow's translation, as conntrack's NAT holds it, and forward_known()'s route lookup */
struct lb_forward {
	struct bpf_fib_lookup fib;
	__u32 src[4]; /* the packet's new source (this node towards the backend, or the client's) */
	__u32 dst[4]; /* and destination (the backend) */
	__be16 sport;
	__be16 dport;
};

/* one per CPU: lb_ingress leaves a subprogram little stack */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct lb_forward);
} lb_forward SEC(".maps");

/* Established TCP flows that ask user space to stop conntrack checking their windows
 * (include/lb.h LB_ASK_EVERY); the foreground run answers. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 64 * 1024);
} lb_asks SEC(".maps");

/* Until when (bpf_ktime_get_ns) a foreground run answers asks: it moves this on every
 * second and clears it when it stops. Past it no flow asks, and an established flow's
 * segments pass to the stack at once, as before there were asks (a persisted lb). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} lb_answered_until SEC(".maps");

/* names struct lb_ask in the skeleton's types, for user space to read asks with */
struct lb_ask *lb_ask_layout __attribute__((unused));

/* The flow's client side decides its backend. */
static __always_inline __u32 flow_hash(const struct l4_packet *pkt)
{
	return client_hash(hash_seed, pkt->saddr, pkt->sport, pkt->proto);
}

/* Options for a conntrack lookup or allocation in this namespace; the kfuncs write `error`,
 * so every call gets them afresh. */
static __always_inline void ct_opts(struct bpf_ct_opts *opts, __u8 l4proto)
{
	__builtin_memset(opts, 0, sizeof(*opts));
	opts->netns_id = BPF_F_CURRENT_NETNS;
	opts->l4proto = l4proto;
}

static __always_inline struct lb_counters *counters(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&lb_counters, &zero);
}

/* The conntrack tuple of the packet as it arrived (client -> VIP) and its size. */
static __always_inline __u32 fill_tuple(const struct l4_packet *pkt, struct bpf_sock_tuple *tuple)
{
	__builtin_memset(tuple, 0, sizeof(*tuple));
	if (pkt->family == AF_INET) {
		tuple->ipv4.saddr = pkt->saddr[0];
		tuple->ipv4.daddr = pkt->daddr[0];
		tuple->ipv4.sport = pkt->sport;
		tuple->ipv4.dport = pkt->dport;
		return sizeof(tuple->ipv4);
	}
	__builtin_memcpy(tuple->ipv6.saddr, pkt->saddr, sizeof(tuple->ipv6.saddr));
	__builtin_memcpy(tuple->ipv6.daddr, pkt->daddr, sizeof(tuple->ipv6.daddr));
	tuple->ipv6.sport = pkt->sport;
	tuple->ipv6.dport = pkt->dport;
	return sizeof(tuple->ipv6);
}

static __always_inline void to_inet_addr(const __u32 *addr, __u8 family, union nf_inet_addr *out)
{
	__builtin_memset(out, 0, sizeof(*out));
	if (family == AF_INET)
		out->ip = addr[0];
	else
		__builtin_memcpy(out->ip6, addr, sizeof(out->ip6));
}

static __always_inline bool has_snat(const struct lb_backend *backend)
{
	return backend->snat_addr[0] | backend->snat_addr[1] | backend->snat_addr[2] | backend->snat_addr[3];
}

/* Brings a slot's port use to the window of `now`. */
static __always_inline void roll_port_use(struct lb_port_use *use, __u64 now)
{
	__u64 window = now / LB_PORT_WINDOW_NS;

	if (use->window == window)
		return;
	use->previous = use->window + 1 == window ? use->current : 0;
	use->current = 0;
	use->window = window;
}

/* Whether the entries made towards a backend lately may hold half its source-NAT ports: the
 * current window's, and the part of the previous window's not yet past the half-open life. */
static __always_inline bool ports_low(struct lb_port_use *use, __u64 now)
{
	__u64 left = LB_PORT_WINDOW_NS - now % LB_PORT_WINDOW_NS;
	__u64 held;

	roll_port_use(use, now);
	held = use->current + (__u64)use->previous * (left >> 20) / (LB_PORT_WINDOW_NS >> 20);
	return held >= LB_PORT_BUDGET;
}

/* The translation of a flow's original direction, conntrack's reply tuple turned around,
 * in lb_forward; the entry's timeout refreshed to `timeout_ms` as conntrack refreshes it for
 * a packet it sees. */
static __always_inline struct lb_forward *translation(struct nf_conn *ct, __u32 timeout_ms)
{
	const struct nf_conntrack_tuple *reply = &ct->tuplehash[IP_CT_DIR_REPLY].tuple;
	struct lb_forward *fwd;
	__u32 zero = 0;

	fwd = bpf_map_lookup_elem(&lb_forward, &zero);
	if (!fwd)
		return NULL;
	__builtin_memcpy(fwd->src, reply->dst.u3.all, sizeof(fwd->src));
	__builtin_memcpy(fwd->dst, reply->src.u3.all, sizeof(fwd->dst));
	/* the ports of TCP and UDP sit alike */
	fwd->sport = reply->dst.u.all;
	fwd->dport = reply->src.u.all;
	bpf_ct_change_timeout(ct, timeout_ms);
	return fwd;
}

/*
 * Whether lb sends this datagram of a UDP flow on itself, past the stack: conntrack has seen
 * the flow both ways (its first datagram and a reply passed the node's hooks and firewall),
 * holds a destination NAT for it, and nothing else works on it (no helper, no expectation,
 * not dying, not a NAT clash). Then its translation, conntrack's reply tuple turned around,
 * goes to lb_forward, and the entry's timeout is refreshed as conntrack refreshes it for a
 * datagram it sees. An IPv6 datagram only where bpf_l4_csum_replace knows IPv6 (the
 * checksum of a CHECKSUM_COMPLETE packet would go wrong before: csum.h).
 */
static __always_inline struct lb_forward *answered_translation(struct nf_conn *ct, const struct l4_packet *pkt)
{
	const unsigned long want = IPS_SEEN_REPLY | IPS_CONFIRMED | IPS_DST_NAT;
	const unsigned long refuse = IPS_EXPECTED | IPS_DYING | IPS_HELPER | IPS_UNTRACKED;
	unsigned long status = ct->status;

	if ((status & want) != want || (status & refuse))
		return NULL;
	if (pkt->family == AF_INET6 && !l4_csum_ipv6_flag)
		return NULL;
	return translation(ct, (status & IPS_ASSURED) ? udp_stream_timeout_ms : udp_timeout_ms);
}

/*
 * Whether lb sends this segment of an established TCP flow on itself, past the stack: as
 * for UDP, conntrack holds a destination NAT for the flow and has seen it both ways, the
 * handshake is done (established, assured), and conntrack checks neither direction's
 * window (IP_CT_TCP_FLAG_BE_LIBERAL both ways, as the kernel's own flow offload leaves an
 * entry whose packets it no longer sees): the segments it does not see cannot make the
 * ones it does see look out of window. A segment with SYN, FIN or RST never gets here: it
 * passes to the stack, which keeps the flow's state. A flow conntrack still checks asks
 * user space, now and then, to stop that (an ask, include/lb.h) and passes.
 */
static __always_inline struct lb_forward *offloaded_translation(struct nf_conn *ct, const struct l4_packet *pkt,
								struct lb_counters *count)
{
	const unsigned long want = IPS_SEEN_REPLY | IPS_CONFIRMED | IPS_DST_NAT | IPS_ASSURED;
	const unsigned long refuse = IPS_EXPECTED | IPS_DYING | IPS_HELPER | IPS_UNTRACKED | IPS_SEQ_ADJUST;
	unsigned long status = ct->status;
	struct lb_ask *ask;

	if ((status & want) != want || (status & refuse) || ct->proto.tcp.state != TCP_CONNTRACK_ESTABLISHED)
		return NULL;
	/* (nor asks where it could not send the segment on) */
	if (pkt->family == AF_INET6 && !l4_csum_ipv6_flag)
		return NULL;
	if (!(ct->proto.tcp.seen[0].flags & ct->proto.tcp.seen[1].flags & IP_CT_TCP_FLAG_BE_LIBERAL)) {
		count->tcp_tracked++;
		if (count->tcp_tracked & (LB_ASK_EVERY - 1))
			return NULL;
		ask = bpf_ringbuf_reserve(&lb_asks, sizeof(*ask), 0);
		if (!ask) {
			count->asks_lost++;
			return NULL;
		}
		__builtin_memcpy(ask->saddr, pkt->saddr, sizeof(ask->saddr));
		__builtin_memcpy(ask->daddr, pkt->daddr, sizeof(ask->daddr));
		ask->sport = pkt->sport;
		ask->dport = pkt->dport;
		ask->family = pkt->family;
		ask->proto = pkt->proto;
		ask->pad[0] = ask->pad[1] = 0;
		bpf_ringbuf_submit(ask, 0);
		count->asked++;
		return NULL;
	}
	return translation(ct, tcp_established_timeout_ms);
}

/*
 * A datagram answered_translation() or a segment offloaded_translation() let through, with
 * its translation in `fwd`: translated here as conntrack's NAT would, its TTL counted down
 * as forwarding does, and sent to the next hop of the translated destination. What the stack would handle otherwise (no neighbour entry yet, larger than the
 * route's MTU, a TTL running out, a destination on this node, forwarding off, a VLAN tag)
 * passes to the stack untouched, where conntrack translates it as before.
 */
static __noinline int forward_known(struct __sk_buff *skb, const struct l4_packet *pkt, struct lb_forward *fwd,
				     struct lb_counters *count)
{
	/* a UDP checksum of zero means none and stays zero; TCP's is always there */
	__u64 mangled = pkt->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	__u64 l4_flags = mangled;
	struct bpf_fib_lookup *fib;
	void *data, *data_end;
	__be16 *ports;
	struct ethhdr *eth;
	__u32 l4_off, csum_off;
	__be32 old_ports, new_ports;
	__s64 diff;

	/* a VLAN tag, in the frame or taken off by the driver, belongs to a VLAN device the
	 * stack hands the packet to: this lookup would route it as the link's own */
	if (pkt->l3_off != sizeof(struct ethhdr) || skb->vlan_present || pkt->fragment)
		return TC_PASS_ON;
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	fib = &fwd->fib;
	__builtin_memset(fib, 0, sizeof(*fib));
	fib->family = pkt->family;
	fib->l4_protocol = pkt->proto;
	fib->sport = fwd->sport;
	fib->dport = fwd->dport;
	fib->ifindex = skb->ingress_ifindex;
	if (pkt->family == AF_INET) {
		struct iphdr *ip = data + sizeof(struct ethhdr);

		if ((void *)(ip + 1) > data_end || ip->ttl <= 1)
			return TC_PASS_ON;
		fib->tos = ip->tos;
		fib->ipv4_src = fwd->src[0];
		fib->ipv4_dst = fwd->dst[0];
	} else {
		struct ipv6hdr *ip6 = data + sizeof(struct ethhdr);

		if ((void *)(ip6 + 1) > data_end || ip6->hop_limit <= 1)
			return TC_PASS_ON;
		fib->flowinfo = *(__be32 *)ip6 & bpf_htonl(0x0fffffff);
		__builtin_memcpy(fib->ipv6_src, fwd->src, sizeof(fib->ipv6_src));
		__builtin_memcpy(fib->ipv6_dst, fwd->dst, sizeof(fib->ipv6_dst));
	}
	/* tot_len 0: the helper checks the packet (GSO too) against the route's MTU */
	if (bpf_fib_lookup(skb, fib, sizeof(*fib), 0) != BPF_FIB_LKUP_RET_SUCCESS)
		return TC_PASS_ON;

	/* the checksum by the helper, which knows the packet's checksum state (a partial
	 * checksum covers the pseudo-header only) */
	csum_off = pkt->l4_csum_off;
	if (pkt->family == AF_INET) {
		l4_flags |= BPF_F_PSEUDO_HDR | sizeof(__be32);
		if (bpf_l4_csum_replace(skb, csum_off, pkt->saddr[0], fwd->src[0], l4_flags) ||
		    bpf_l4_csum_replace(skb, csum_off, pkt->daddr[0], fwd->dst[0], l4_flags))
			return TC_ACT_SHOT;
	} else {
		/* saddr and daddr follow each other in both */
		diff = bpf_csum_diff((__be32 *)pkt->saddr, 32, (__be32 *)fwd->src, 32, 0);
		if (bpf_l4_csum_replace(skb, csum_off, 0, diff, mangled | BPF_F_PSEUDO_HDR | l4_csum_ipv6_flag))
			return TC_ACT_SHOT;
	}
	old_ports = ports_word(pkt->sport, pkt->dport);
	new_ports = ports_word(fwd->sport, fwd->dport);
	if (bpf_l4_csum_replace(skb, csum_off, old_ports, new_ports, mangled | sizeof(__be32)))
		return TC_ACT_SHOT;

	/* the helpers may have moved the packet */
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	l4_off = pkt->l4_off;
	asm volatile("" : "+r"(l4_off));
	l4_off &= 0x1ff;
	eth = data;
	ports = data + l4_off;
	if ((void *)(ports + 2) > data_end)
		return TC_ACT_SHOT;
	if (pkt->family == AF_INET) {
		struct iphdr *ip = data + sizeof(struct ethhdr);
		__be32 old_words[2], new_words[2];
		__u32 check;

		if ((void *)(ip + 1) > data_end)
			return TC_ACT_SHOT;
		old_words[0] = ip->saddr;
		old_words[1] = ip->daddr;
		ip->saddr = fwd->src[0];
		ip->daddr = fwd->dst[0];
		new_words[0] = ip->saddr;
		new_words[1] = ip->daddr;
		ip->check = csum_replace(ip->check, old_words, new_words, 2);
		/* as ip_decrease_ttl() */
		check = (__u32)ip->check + bpf_htons(0x0100);
		ip->check = (__sum16)(check + (check >= 0xffff));
		ip->ttl--;
	} else {
		struct ipv6hdr *ip6 = data + sizeof(struct ethhdr);

		if ((void *)(ip6 + 1) > data_end)
			return TC_ACT_SHOT;
		__builtin_memcpy(&ip6->saddr, fwd->src, sizeof(ip6->saddr));
		__builtin_memcpy(&ip6->daddr, fwd->dst, sizeof(ip6->daddr));
		ip6->hop_limit--;
	}
	ports[0] = fwd->sport;
	ports[1] = fwd->dport;
	__builtin_memcpy(eth->h_dest, fib->dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib->smac, ETH_ALEN);
	if (pkt->proto == IPPROTO_UDP)
		count->forwarded++;
	else
		count->tcp_forwarded++;
	return bpf_redirect(fib->ifindex, 0);
}

/* A new flow to a service without a usable backend: answered as a host without a listener
 * would (include/reject.h), out the interface it came in; dropped when not answerable. A
 * subprogram: inlined, its bounds checks went through stack slots that 6.1's verifier
 * refills without the bounds ("math between pkt pointer and register with unbounded min
 * value"). */
static __noinline int refuse(struct __sk_buff *skb, const struct l4_packet *pkt, struct lb_counters *count)
{
	struct reject_info info;
	__u32 pull;

	count->refused++;
	if (!reject_read((void *)(long)skb->data, (void *)(long)skb->data_end, pkt, &info))
		return TC_ACT_SHOT;
	if (info.grow && bpf_skb_adjust_room(skb, info.grow, BPF_ADJ_ROOM_MAC, 0))
		return TC_ACT_SHOT;
	if (skb->len != info.len && bpf_skb_change_tail(skb, info.len, 0))
		return TC_ACT_SHOT;
	/* the headers written: linear and writable */
	pull = info.len < MAX_HDR_PULL ? info.len : MAX_HDR_PULL;
	if (bpf_skb_pull_data(skb, pull))
		return TC_ACT_SHOT;
	if (!reject_write((void *)(long)skb->data, (void *)(long)skb->data_end, &info))
		return TC_ACT_SHOT;
	return bpf_redirect(skb->ifindex, 0);
}

/* Whether a TCP segment carries data. A bare ACK passes to the stack unlooked-up: the
 * handshake's last ACK of every connection (conntrack has not assured the flow yet), and a
 * download's ACKs, whose data comes the other way through conntrack anyway (measured: the
 * backend sending, lb 0.96-1.02x nftables with or without its ACKs sent on). */
static __always_inline bool carries_data(struct __sk_buff *skb, const struct l4_packet *pkt)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u32 l4_off = pkt->l4_off;
	__u8 *doff;

	asm volatile("" : "+r"(l4_off));
	l4_off &= 0x1ff;
	doff = data + l4_off + 12;
	if ((void *)(doff + 1) > data_end)
		return false;
	return skb->len > l4_off + (*doff >> 4) * 4;
}

/* Whether a foreground run answers asks now. */
static __always_inline bool answered(void)
{
	__u32 zero = 0;
	__u64 *until = bpf_map_lookup_elem(&lb_answered_until, &zero);

	return until && *until > bpf_ktime_get_ns();
}

/* A segment of an established TCP flow to a service: sent on here when conntrack has let
 * go of the flow's windows (offloaded_translation), else passed to the stack. */
static __noinline int tcp_established(struct __sk_buff *skb, const struct l4_packet *pkt, struct lb_counters *count)
{
	struct bpf_sock_tuple tuple;
	struct bpf_ct_opts opts;
	struct lb_forward *forward;
	struct nf_conn *ct;
	__u32 tuple_sz;

	tuple_sz = fill_tuple(pkt, &tuple);
	ct_opts(&opts, IPPROTO_TCP);
	ct = bpf_skb_ct_lookup(skb, &tuple, tuple_sz, &opts, CT_OPTS_SZ);
	if (!ct)
		return TC_PASS_ON;
	forward = offloaded_translation(ct, pkt, count);
	bpf_ct_release(ct);
	return forward ? forward_known(skb, pkt, forward, count) : TC_PASS_ON;
}

SEC("tc/ingress")
int lb_ingress(struct __sk_buff *skb)
{
	struct bpf_ct_opts opts;
	struct service_endpoint vip = {};
	struct service_range *service, range;
	struct lb_counters *count;
	struct lb_backend *backend;
	struct bpf_sock_tuple tuple;
	struct nf_conn___init *fresh;
	union nf_inet_addr addr;
	struct l4_packet pkt;
	struct nf_conn *ct;
	struct lb_stats *stats;
	struct lb_port_use *use = NULL;
	struct affinity_key client;
	__u32 tuple_sz, slot, hash;
	bool nat_ok = true, remembered = false, opener;
	int kept;
	__u64 now;

	if (!parse_skb_l4(skb, &pkt))
		return TC_PASS_ON;
	/* a packet that can open a flow: a TCP SYN, any UDP datagram. Of the later TCP
	 * segments lb may send on those of an established flow (tcp_established); the ones
	 * that change the flow's state are conntrack's. */
	opener = pkt.proto != IPPROTO_TCP || (pkt.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
	if (!opener &&
	    ((pkt.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_FIN | TCP_FLAG_RST)) || !carries_data(skb, &pkt) || !answered()))
		return TC_PASS_ON;
	__builtin_memcpy(vip.addr, pkt.daddr, sizeof(vip.addr));
	vip.port = pkt.dport;
	vip.family = pkt.family;
	vip.proto = pkt.proto;
	service = bpf_map_lookup_elem(&lb_services, &vip);
	if (!service)
		return TC_PASS_ON;
	range = *service;
	if (range.count > LB_MAX_BACKENDS_PER_SERVICE)
		return TC_PASS_ON;
	count = counters();
	if (!count)
		return TC_PASS_ON;
	if (!opener)
		return tcp_established(skb, &pkt, count);

	tuple_sz = fill_tuple(&pkt, &tuple);
	ct_opts(&opts, pkt.proto);
	ct = bpf_skb_ct_lookup(skb, &tuple, tuple_sz, &opts, CT_OPTS_SZ);
	if (ct) {
		/*
		 * A SYN on an entry of a closed connection (a client reusing its port soon after
		 * an RST or FIN) makes conntrack drop that entry and start a new one of its own,
		 * without our NAT. Expire it here instead; the second lookup removes it.
		 */
		bool reopened = pkt.proto == IPPROTO_TCP && ct->proto.tcp.state >= TCP_CONNTRACK_TIME_WAIT &&
				ct->proto.tcp.state <= TCP_CONNTRACK_CLOSE;
		struct lb_forward *forward = NULL;

		if (reopened)
			bpf_ct_change_timeout(ct, 0);
		else if (pkt.proto == IPPROTO_UDP)
			forward = answered_translation(ct, &pkt);
		bpf_ct_release(ct);
		if (!reopened) {
			count->known_flows++;
			return forward ? forward_known(skb, &pkt, forward, count) : TC_PASS_ON;
		}
		count->reopened++;
		ct_opts(&opts, pkt.proto);
		ct = bpf_skb_ct_lookup(skb, &tuple, tuple_sz, &opts, CT_OPTS_SZ);
		if (ct) {
			bpf_ct_release(ct);
			count->insert_failed++;
			return TC_PASS_ON;
		}
	}

	if (!range.weight)
		return refuse(skb, &pkt, count);
	hash = flow_hash(&pkt);
	now = bpf_ktime_get_ns();
	if (range.flags & SERVICE_AFFINITY) {
		__builtin_memset(&client, 0, sizeof(client));
		client.service = vip;
		__builtin_memcpy(client.client, pkt.saddr, sizeof(client.client));
		kept = affinity_slot(&lb_affinity, &lb_backends, &lb_weights, &range, &client, now);
		if (kept >= 0) {
			slot = kept;
			remembered = true;
		} else if (pick_weighted_slot(&lb_weights, &range, hash, &slot)) {
			return TC_PASS_ON;
		}
	} else if (pick_weighted_slot(&lb_weights, &range, hash, &slot)) {
		return TC_PASS_ON;
	}
	backend = bpf_map_lookup_elem(&lb_backends, &slot);
	if (!backend || backend->endpoint.family != pkt.family)
		return TC_PASS_ON;
	if (flood_over_rate(&lb_flood, flood_rate, now)) {
		if (!flood_asked_again(&lb_flood_seen, hash, now)) {
			count->flood_dropped++;
			return TC_ACT_SHOT;
		}
		count->flood_admitted++;
	} else if (has_snat(backend)) {
		/* below the rate a slower flood can still take every port towards the backend */
		use = bpf_map_lookup_elem(&lb_port_use, &slot);
		if (use && ports_low(use, now)) {
			if (!flood_asked_again(&lb_flood_seen, hash, now)) {
				count->ports_low_dropped++;
				return TC_ACT_SHOT;
			}
			count->ports_low_admitted++;
		}
	}
	if (!use && has_snat(backend))
		use = bpf_map_lookup_elem(&lb_port_use, &slot);

	ct_opts(&opts, pkt.proto);
	/* From here a packet without its entry is dropped, not passed on: the node's own stack
	 * would answer a SYN to the VIP with an RST (the client gives up at once) where a drop
	 * makes it retry. */
	fresh = bpf_skb_ct_alloc(skb, &tuple, tuple_sz, &opts, CT_OPTS_SZ);
	if (!fresh) {
		count->alloc_failed++;
		return TC_ACT_SHOT;
	}
	bpf_ct_set_timeout(fresh, pkt.proto == IPPROTO_TCP ? LB_TCP_NEW_TIMEOUT_MS : LB_UDP_NEW_TIMEOUT_MS);
	/* destination first: the source NAT then picks a port unique towards the backend */
	to_inet_addr(backend->endpoint.addr, pkt.family, &addr);
	if (bpf_ct_set_nat_info(fresh, &addr, bpf_ntohs(backend->endpoint.port), NF_NAT_MANIP_DST)) {
		count->nat_failed++;
		/* an entry can only leave through insertion: make it die at once */
		bpf_ct_set_timeout(fresh, 1);
		nat_ok = false;
	} else if (has_snat(backend)) {
		to_inet_addr(backend->snat_addr, pkt.family, &addr);
		/* port 0: keep the client's port unless that tuple is taken */
		if (bpf_ct_set_nat_info(fresh, &addr, 0, NF_NAT_MANIP_SRC)) {
			count->nat_failed++;
			bpf_ct_set_timeout(fresh, 1);
			nat_ok = false;
		}
	}
	ct = bpf_ct_insert_entry(fresh);
	if (!ct) {
		/* the same flow inserted by another CPU meanwhile, or (a flood) no source port
		 * left towards the backend: the tuple clashes */
		ct_opts(&opts, pkt.proto);
		ct = bpf_skb_ct_lookup(skb, &tuple, tuple_sz, &opts, CT_OPTS_SZ);
		if (ct) {
			bpf_ct_release(ct);
			count->insert_raced++;
			return TC_PASS_ON;
		}
		count->insert_failed++;
		/* no port left, whatever the estimate said (another service's flows to the same
		 * backend, established ones): ports are low until the window after next */
		if (use) {
			roll_port_use(use, now);
			if (use->current < LB_PORT_BUDGET)
				use->current = LB_PORT_BUDGET;
		}
		return TC_ACT_SHOT;
	}
	bpf_ct_release(ct);
	if (!nat_ok)
		return TC_ACT_SHOT;
	if (use) {
		roll_port_use(use, now);
		__sync_fetch_and_add(&use->current, 1);
	}
	count->new_flows++;
	if ((range.flags & SERVICE_AFFINITY) && !remembered)
		affinity_remember(&lb_affinity, &range, &client, &backend->endpoint, slot, now);
	stats = bpf_map_lookup_elem(&lb_stats, &slot);
	if (stats)
		__sync_fetch_and_add(&stats->new_flows, 1);
	return TC_PASS_ON;
}

char LICENSE[] SEC("license") = "GPL";
