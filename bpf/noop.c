// SPDX-License-Identifier: GPL-2.0
/* Do-nothing programs of each hook: the baseline that per-packet benchmarks compare against. */
#include "common.h"

SEC("tc")
int noop_tc(struct __sk_buff *skb)
{
	return TC_PASS_ON;
}

SEC("xdp")
int noop_xdp(struct xdp_md *ctx)
{
	return XDP_PASS;
}

/* The least an XDP load balancer does: send the frame back out with its MACs swapped. The
 * baseline of xdp-lb's per-packet cost. */
SEC("xdp")
int xdp_mac_swap(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	__u8 mac[6];

	if ((void *)(eth + 1) > data_end)
		return XDP_PASS;
	__builtin_memcpy(mac, eth->h_source, 6);
	__builtin_memcpy(eth->h_source, eth->h_dest, 6);
	__builtin_memcpy(eth->h_dest, mac, 6);
	return XDP_TX;
}

/* The packet-rate benchmark (benches/suite/rate.rs): a frame source and a sink.
 *
 * rate_source runs through BPF_PROG_RUN's live-frame mode with the client's veth as its
 * interface: every frame it returns XDP_TX for leaves that veth for the load balancer's end,
 * whose XDP program (the one measured) sees it in its driver. The kernel recycles a frame's
 * page without restoring what a program wrote into it, so the source writes the frame under
 * test over the page every time; with rate_new_flows, every frame gets a source address and
 * port of its own (a new flow for a load balancer). */
#define RATE_FRAME_LEN 64
__u8 rate_frame[RATE_FRAME_LEN];
__u32 rate_new_flows;
__u64 rate_seq;

SEC("xdp")
int rate_source(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct iphdr *ip = data + sizeof(struct ethhdr);
	struct udphdr *udp = (void *)(ip + 1);
	__u32 seq, sum = 0;
	__u16 *word;

	if (data + RATE_FRAME_LEN > data_end)
		return XDP_ABORTED;
	__builtin_memcpy(data, rate_frame, RATE_FRAME_LEN);
	if (!rate_new_flows)
		return XDP_TX;
	/* IPv4 and UDP without a checksum (the frame the benchmark writes): the source address's
	 * last two bytes and the source port from a sequence, 2^31 flows before one repeats */
	if ((void *)(udp + 1) > data_end || ip->ihl != 5)
		return XDP_ABORTED;
	seq = rate_seq++;
	ip->saddr = (ip->saddr & bpf_htonl(0xffff0000)) | bpf_htonl((seq >> 15) & 0xffff);
	udp->source = bpf_htons(1024 + (seq & 0x7fff));
	ip->check = 0;
	word = (__u16 *)ip;
#pragma unroll
	for (int i = 0; i < 10; i++)
		sum += word[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	ip->check = ~sum & 0xffff;
	return XDP_TX;
}

/* Where the benchmark's frames end: counted and dropped. With rate_sink_keep, the first
 * RATE_FRAME_LEN bytes of the last IPv4 UDP frame are kept (the benchmark reads the port a
 * load balancer chose off them to write its backend's reply; the veth's own IPv6 router
 * solicitations arrive here too). */
__u64 rate_sink_frames;
__u32 rate_sink_keep;
__u8 rate_sink_last[RATE_FRAME_LEN];

SEC("xdp")
int rate_sink(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;

	__sync_fetch_and_add(&rate_sink_frames, 1);
	if (rate_sink_keep && data + RATE_FRAME_LEN <= data_end &&
	    ((struct ethhdr *)data)->h_proto == bpf_htons(ETH_P_IP) &&
	    ((struct iphdr *)(data + sizeof(struct ethhdr)))->protocol == IPPROTO_UDP)
		__builtin_memcpy(rate_sink_last, data, RATE_FRAME_LEN);
	return XDP_DROP;
}

/* cgroup sock_addr hooks: let the call go on untouched */
SEC("cgroup/connect4")
int noop_connect4(struct bpf_sock_addr *ctx)
{
	return 1;
}

SEC("cgroup/sendmsg4")
int noop_sendmsg4(struct bpf_sock_addr *ctx)
{
	return 1;
}

char LICENSE[] SEC("license") = "GPL";
