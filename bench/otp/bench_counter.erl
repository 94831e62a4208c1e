%% bench_counter, version 1: the idle "counter" gen_server used by the
%% spawn_idle, call_host, call_proc and reload_* workloads.
%%
%% State: #{count => integer()}.  `inc` adds 1 and replies with the new count.
%% Version 2 (v2/bench_counter.erl, same module name) migrates the state in
%% code_change/3 and adds 10 per `inc`.
-module(bench_counter).
-behaviour(gen_server).
-vsn(1).

-export([start/0, start/1, inc/1, get/1]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2,
         terminate/2, code_change/3]).

%% Not linked: the benchmark starts up to 100 000 of these from one process
%% and tears them down with exit(Pid, kill); links would add a link entry
%% to every process and to the starter.
start() -> start(0).
start(Count) -> gen_server:start(?MODULE, Count, []).

inc(Pid) -> gen_server:call(Pid, inc).
get(Pid) -> gen_server:call(Pid, get).

init(Count) ->
    {ok, #{count => Count}}.

handle_call(inc, _From, #{count := C} = State) ->
    {reply, C + 1, State#{count := C + 1}};
handle_call(get, _From, #{count := C} = State) ->
    {reply, C, State};
handle_call(_Other, _From, State) ->
    {reply, {error, unknown_call}, State}.

handle_cast(_Msg, State) ->
    {noreply, State}.

handle_info(_Msg, State) ->
    {noreply, State}.

terminate(_Reason, _State) ->
    ok.

code_change(_OldVsn, State, _Extra) ->
    {ok, State}.
