%% bench_caller: a gen_server that, inside one handle_call, performs M
%% gen_server:call/2 round trips to another gen_server (a bench_counter).
%% Used by the call_proc workload.
-module(bench_caller).
-behaviour(gen_server).

-export([start/0, call_loop/3]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2,
         terminate/2, code_change/3]).

start() -> gen_server:start(?MODULE, [], []).

%% Ask Caller to do M inner calls to Target; returns the last reply.
call_loop(Caller, Target, M) ->
    gen_server:call(Caller, {call_loop, Target, M}, infinity).

init([]) ->
    {ok, #{}}.

handle_call({call_loop, Target, M}, _From, State) ->
    {reply, loop(Target, M, undefined), State};
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

loop(_Target, 0, Last) ->
    Last;
loop(Target, K, _Last) ->
    loop(Target, K - 1, gen_server:call(Target, inc)).
